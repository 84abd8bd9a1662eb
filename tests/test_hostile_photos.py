"""Issue 24: hostile photo folders, class names and resume options, tried for real.

Each family of the issue with real files (FIFOs made by os.mkfifo, 200 GiB sparse files made by truncate,
long, TeX-like and non-UTF-8 names made as bytes paths, moved and edited folders) and real commands: the
cases that could hang run as a separate ``python -m cifarlab`` process with a timeout, so a hang fails
the test instead of hanging CI. No case may end in a traceback, a hang, a run that cannot be read back,
or a silent change of what was asked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.checkpoints import check_input_shape, load_checkpoint, save_checkpoint
from cifarlab.cli import main as cli_main
from cifarlab.data import Dataset, Split, load_dataset
from cifarlab.data.base import check_class_names, printable
from cifarlab.errors import CheckpointError, DataError
from cifarlab.models import Net, get_declaration
from cifarlab.validation import MAX_CLASS_NAME, ValidationError, check_meta

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos" / "hymenoptera_data" / "train"
HUGE = 200 * 1024 ** 3  # a sparse file's size: nothing may read it

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy_photos(dest: Path, per_class: int = 6, classes: dict[bytes | str, str] | None = None) -> Path:
    """``per_class`` real photos of each class; ``classes`` maps the folder name to make (str or bytes)
    to the real class it takes its photos from (default: ants and bees)."""
    if not PHOTOS.is_dir():
        pytest.fail(f"the real photos are needed at {PHOTOS}")
    classes = classes or {"ants": "ants", "bees": "bees"}
    for folder, source in classes.items():
        target = os.path.join(os.fsencode(dest), os.fsencode(folder))
        os.makedirs(target)
        for name in sorted(os.listdir(PHOTOS / source))[:per_class]:
            shutil.copy(PHOTOS / source / name, os.path.join(target, os.fsencode(name)))
    return dest


def _cli(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m cifarlab ARGS`` as its own process; a hang is a TimeoutExpired (the process is killed)."""
    environment = dict(os.environ, PYTHONIOENCODING="utf-8", LC_ALL="C.UTF-8", **(env or {}))
    return subprocess.run([sys.executable, "-m", "cifarlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=timeout)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return done.stderr


def _main(args, capsys) -> tuple[int, str, str]:
    """cli.main in this process; torch's thread count is put back (train --threads changes it)."""
    threads = torch.get_num_threads()
    try:
        code = cli_main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def _train_args(spec: str, runs: Path, name: str, *extra) -> list[str]:
    return ["train", "--dataset", spec, "--runs-dir", runs, "--name", name, "--image-size", "16", "--threads", "1",
            "--no-progress", "--no-diagnosis", *extra]


# ---------------------------------------------------------------------------------------------------
# Special files inside a photo folder and named like data files


def test_a_fifo_and_a_sparse_file_named_like_photos_are_skipped_not_waited_on(tmp_path):
    root = _copy_photos(tmp_path / "photos", per_class=4)
    os.mkfifo(root / "ants" / "pipe.jpg")
    with open(root / "bees" / "huge.png", "wb") as f:
        f.truncate(HUGE)
    # No --image-size: the automatic size reads headers first, then every file is hashed and decoded.
    done = _cli("data", "--dataset", f"folder:{root}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note: skipped ants/pipe.jpg: not a regular file" in done.stdout
    assert "note: skipped bees/huge.png: 204,800 MiB is more than the 256 MiB" in done.stdout
    counts = re.search(r"([\d,]+) training and ([\d,]+) test images", done.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 8, done.stdout  # the 8 real photos, nothing else
    refused = _one_line_error(_cli("data", "--dataset", f"folder:{root}", "--image-size", "16", "--strict"))
    assert "2 file(s) could not be read (--strict)" in refused and "pipe.jpg" in refused and "huge.png" in refused


def test_data_files_that_are_fifos_or_sparse_are_refused_before_reading(tmp_path, data_dir):
    sparse_npy = tmp_path / "sparse"
    sparse_npy.mkdir()
    for name in ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"):
        with open(sparse_npy / name, "wb") as f:
            f.truncate(HUGE)
    err = _one_line_error(_cli("data", "--dataset", "cifar10.1", "--data-dir", sparse_npy, "--no-download"))
    assert "cifar10.1_v6_data.npy" in err and "refusing to read it" in err

    batches = tmp_path / "cifar-10-batches-bin"  # the real files, but data_batch_1.bin is 200 GiB of holes
    batches.mkdir()
    for path in data_dir.iterdir():
        (batches / path.name).symlink_to(path)
    (batches / "data_batch_1.bin").unlink()
    with open(batches / "data_batch_1.bin", "wb") as f:
        f.truncate(HUGE)
    err = _one_line_error(_cli("data", "--data-dir", batches, "--no-download"))
    assert "data_batch_1.bin" in err and "refusing to read it" in err

    fifo_npy = tmp_path / "fifo"
    fifo_npy.mkdir()
    os.mkfifo(fifo_npy / "cifar10.1_v6_data.npy")
    (fifo_npy / "cifar10.1_v6_labels.npy").write_bytes(b"\x93NUMPY")
    err = _one_line_error(_cli("data", "--dataset", "cifar10.1", "--data-dir", fifo_npy, "--no-download"))
    assert "cifar10.1_v6_data.npy" in err


# ---------------------------------------------------------------------------------------------------
# ~user paths and the cache folder


def test_unknown_users_in_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    err = _one_line_error(_cli("train", "--dataset", "folder:~nosuchuser/photos", "--runs-dir", tmp_path))
    assert "folder:~nosuchuser/photos: cannot expand '~nosuchuser'" in err
    code, _, err = _main(["data", "--data-dir", "~nosuchuser/cifar"], capsys)
    assert code == 2 and "--data-dir=~nosuchuser/cifar: cannot expand" in err
    code, _, err = _main(["data", "--dataset", "cifar10.1", "--data-dir", "~nosuchuser/x"], capsys)
    assert code == 2 and "--data-dir=~nosuchuser/x: cannot expand" in err
    monkeypatch.setenv("CIFARLAB_DATA", "~nosuchuser/data")
    code, _, err = _main(["data"], capsys)
    assert code == 2 and "CIFARLAB_DATA=~nosuchuser/data: cannot expand" in err
    photos = _copy_photos(tmp_path / "photos", per_class=2)
    monkeypatch.setenv("CIFARLAB_CACHE", "~nosuchuser/cache")
    code, _, err = _main(["data", "--dataset", f"folder:{photos}", "--image-size", "16"], capsys)
    assert code == 2 and "CIFARLAB_CACHE=~nosuchuser/cache: cannot expand" in err


@pytest.mark.parametrize("under", ["", "sub/cache"])
def test_a_cache_at_or_under_a_regular_file_is_named(tmp_path, capsys, monkeypatch, under):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CIFARLAB_CACHE", str(blocker / under) if under else str(blocker))
    photos = _copy_photos(tmp_path / "photos", per_class=2)
    code, out, err = _main(["data", "--dataset", f"folder:{photos}", "--image-size", "16"], capsys)
    assert code == 2 and err.count("\n") == 1, out + err
    assert f"CIFARLAB_CACHE={blocker}" in err and "point it at a folder" in err
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------------
# Class names are data


@pytest.fixture(scope="module")
def odd_names_run(tmp_path_factory):
    """A run trained (in its own process) on class folders named like TeX, 250 characters long and not
    UTF-8, with a non-UTF-8 photo that cannot be decoded (so a note prints its name)."""
    base = tmp_path_factory.mktemp("odd")
    classes = {"$x^$": "ants", "\\nosuchmacro": "bees", "c" * 250: "ants", b"caf\xe9": "bees"}
    root = _copy_photos(base / "photos", per_class=3, classes=classes)
    with open(os.path.join(os.fsencode(root), b"caf\xe9", b"\xff broken.jpg"), "wb") as f:
        f.write(b"not an image at all")
    done = _cli(*_train_args(f"folder:{root}", base / "runs", "odd", "--epochs", "1"), cwd=base, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note: skipped caf\\xe9/\\xff broken.jpg: not an image file" in done.stdout
    return base / "runs" / "odd", ["$x^$", "\\nosuchmacro", "caf\\xe9", "c" * 250]  # the folders, sorted


def test_odd_class_names_train_read_back_and_evaluate(odd_names_run, capsys, tmp_path):
    run, expected = odd_names_run
    ckpt = load_checkpoint(run)  # the run reads back: no "damaged" checkpoint
    assert ckpt.meta["classes"] == expected
    listed = json.loads((run / "dataset.json").read_text())
    assert listed["classes"] == expected
    files = listed["files"]["train"] + listed["files"]["test"]
    assert sum(f.startswith("caf\\xe9/") for f in files) == 3  # the class's photos, its broken file skipped
    assert all(f == printable(f) for f in files)  # no undecodable byte or control character left
    code, out, err = _main(["evaluate", run, "--out", tmp_path / "eval"], capsys)
    assert code == 0, out + err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["classes"] == expected
    for png in ("confusion_matrix.png", "per_class_accuracy.png", "gallery.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_are_drawn_as_text_not_math(tmp_path):
    from cifarlab import plots

    names = ["$x^$", "\\nosuchmacro", "$\\frac{1}{0", "a_b^c$", "c" * 1000]
    cm = torch.eye(len(names), dtype=torch.int64).numpy() * 3
    plots.confusion_matrix_plot(cm, names, tmp_path / "cm.png")
    plots.per_class_accuracy_plot({n: 0.5 for n in names}, tmp_path / "acc.png")
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    title = ax.set_title(names[0])
    assert not title.get_parse_math()  # drawn as the characters, whatever they are
    plt.close(fig)
    assert plots.label("c" * 1000) == "c" * (plots.MAX_LABEL - 1) + "\u2026"
    for png in ("cm.png", "acc.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_long_names_are_bounded_by_one_constant_for_writer_and_reader(tmp_path):
    longest = ["a" * MAX_CLASS_NAME, "b"]
    check_class_names(longest, "test")  # loading accepts it ...
    meta = {"architecture": {}, "classes": longest, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    check_meta(meta, "meta.json")  # ... and so does reading a checkpoint back
    too_long = ["a" * (MAX_CLASS_NAME + 1), "b"]
    with pytest.raises(DataError, match=f"1,025 characters.*at most {MAX_CLASS_NAME:,}"):
        check_class_names(too_long, "test")
    with pytest.raises(ValidationError):
        check_meta(dict(meta, classes=too_long), "meta.json")
    # train() refuses such names before anything is written (a dataset made in code, not loaded).
    from cifarlab.train import recipe_from, train

    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1] * 4))
    data = Dataset(train=split, test=split, classes=too_long, name="custom", spec="custom")
    with pytest.raises(DataError, match="characters"):
        train(recipe_from("exercise", epochs=1), data, tmp_path / "run", log=lambda *a, **k: None)
    assert not (tmp_path / "run").exists()


def test_a_ten_thousand_character_cifar100_class_is_refused_before_training(tmp_path, capsys):
    from cifarlab.data.cifar100 import ARCHIVE

    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, size in ARCHIVE.file_sizes.items():  # right sizes, all holes: never read here
        with open(folder / name, "wb") as f:
            f.truncate(size)
    names = [f"class{i}" for i in range(100)]
    names[7] = "x" * 10_000
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    code, out, err = _main(["train", "--dataset", "cifar100", "--data-dir", folder, "--runs-dir",
                            tmp_path / "runs", "--name", "long", "--max-steps", "1"], capsys)
    assert code == 2 and "class 7 is named with 10,000 characters" in err and err.count("\n") == 1, out + err
    assert not (tmp_path / "runs").exists()


def test_printable_names_are_lossless_for_utf8_and_one_line_for_the_rest():
    assert printable("ants") == "ants" and printable("émoji 👨\u200d👩\u200d👧") == "émoji 👨\u200d👩\u200d👧"
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("two\nlines\t") == "two\\nlines\\t"


# ---------------------------------------------------------------------------------------------------
# Image size, relative paths, resume and calibrate identity


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    """A 16 px run of the exercise net (its head flattens), trained from a relative --dataset path, with
    --split-seed 3 and a checkpoint per step; returns (run folder, photos folder)."""
    base = tmp_path_factory.mktemp("run16")
    photos = _copy_photos(base / "photos")
    old = os.getcwd()
    threads = torch.get_num_threads()
    os.chdir(base)
    try:
        code = cli_main([str(a) for a in _train_args("folder:photos", base / "runs", "r16", "--split-seed", "3",
                                                      "--max-steps", "2", "--checkpoint-every", "1")])
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    assert code == 0
    return base / "runs" / "r16", photos


def test_a_relative_dataset_path_is_stored_resolved(run16, tmp_path, capsys, monkeypatch):
    run, photos = run16
    assert json.loads((run / "dataset.json").read_text())["spec"] == f"folder:{photos.resolve()}"
    monkeypatch.chdir(tmp_path)  # another working folder
    code, out, err = _main(["evaluate", run, "--out", tmp_path / "eval"], capsys)
    assert code == 0 and "Test accuracy" in out, out + err


def test_a_flattening_run_refuses_another_image_size_naming_what_to_pass(run16, capsys, tmp_path):
    run, photos = run16
    for command in (["evaluate", run, "--out", tmp_path / "e"], ["visualize", run, "--out", tmp_path / "v"]):
        code, out, err = _main([*command, "--dataset", f"folder:{photos}", "--image-size", "32"], capsys)
        assert code == 2 and err.count("\n") == 1, out + err
        assert "takes 3x16x16 images" in err and "3x32x32" in err and "--image-size 16" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "v").exists()


def test_a_pooling_net_takes_other_sizes_with_the_same_weights(tmp_path):
    net = Net(get_declaration("fast", 2, (3, 16, 16)))
    save_checkpoint(tmp_path / "ckpt", net, {"architecture": net.declaration, "classes": ["a", "b"],
                                             "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    ckpt = load_checkpoint(tmp_path / "ckpt")
    check_input_shape(ckpt, (3, 32, 32))  # global pool: accepted, and it runs
    assert ckpt.model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(CheckpointError, match="takes 3x16x16 images and the data is 1x16x16"):
        check_input_shape(ckpt, (1, 16, 16))


def test_resume_refuses_data_options_that_differ_and_evaluate_names_them_ignored(run16, capsys, tmp_path):
    run, _ = run16
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    for option, words in ((["--image-size", "32"], "image size 16, not --image-size 32"),
                          (["--split-seed", "5"], "split seed 3, not --split-seed 5"),
                          (["--test-fraction", "0.5"], "test fraction 0.2, not --test-fraction 0.5")):
        code, out, err = _main(["train", "--resume", "--name", "r16", "--runs-dir", run.parent, "--threads", "1",
                                "--max-steps", "3", *option], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, out + err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing trained
    code, out, err = _main(["evaluate", run, "--split-seed", "5", "--out", tmp_path / "eval"], capsys)
    assert code == 0 and "note: --split-seed 5 ignored" in out and "(split seed 3)" in out, out + err


def test_a_moved_folder_resumes_by_content_and_a_changed_one_is_refused(tmp_path, capsys):
    photos = _copy_photos(tmp_path / "photos")
    runs = tmp_path / "runs"
    code, out, err = _main(_train_args(f"folder:{photos}", runs, "moved", "--split-seed", "3", "--max-steps", "2",
                                       "--checkpoint-every", "1"), capsys)
    assert code == 0, out + err
    moved = photos.rename(tmp_path / "elsewhere")
    resume = ["train", "--resume", "--name", "moved", "--runs-dir", runs, "--threads", "1", "--no-progress",
              "--dataset", f"folder:{moved}"]
    code, out, err = _main([*resume, "--max-steps", "1"], capsys)  # its split seed comes from the run
    assert code == 0 and "resuming from" in out, out + err
    assert load_checkpoint(runs / "moved").meta["global_step"] == 3  # one step more than the 2 it had
    first = sorted((moved / "ants").iterdir())[0]
    shutil.copy(sorted((moved / "bees").iterdir())[0], first)  # one picture is now another one
    code, out, err = _main([*resume, "--max-steps", "1"], capsys)
    assert code == 2 and "content_sha256" in err, out + err


def test_calibrate_refuses_changed_pictures_and_other_data_options(tmp_path, capsys):
    photos = _copy_photos(tmp_path / "photos")
    runs = tmp_path / "runs"
    code, out, err = _main(_train_args(f"folder:{photos}", runs, "cal", "--epochs", "1", "--val-split", "2"),
                           capsys)
    assert code == 0, out + err
    code, out, err = _main(["calibrate", runs / "cal", "--json"], capsys)
    assert code == 0 and json.loads(out)["images"] == 2, out + err
    code, out, err = _main(["calibrate", runs / "cal", "--image-size", "32"], capsys)
    assert code == 2 and "image size 16, not --image-size 32" in err, out + err
    stamp = (runs / "cal" / "final" / "meta.json").read_bytes()
    for picture in sorted((photos / "ants").iterdir()):
        shutil.copy(sorted((photos / "bees").iterdir())[0], picture)  # every ant photo is now a bee
    code, out, err = _main(["calibrate", runs / "cal"], capsys)
    assert code == 2 and "the data is not what this run trained on" in err and err.count("\n") == 1, out + err
    assert (runs / "cal" / "final" / "meta.json").read_bytes() == stamp  # the run is unchanged


def test_load_dataset_resolves_the_folder_it_stores(tmp_path, monkeypatch):
    _copy_photos(tmp_path / "photos", per_class=2)
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("folder:photos", image_size=16)
    assert ds.spec == f"folder:{(tmp_path / 'photos').resolve()}"
