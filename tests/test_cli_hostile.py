"""Issue 14, cases 8-12 on the command line: one-line errors instead of tracebacks or nonsense.

--device that does not exist, a report over a malformed results.json, --name that would leave
--runs-dir, a Ctrl-C hint that works as printed (``--resume`` takes the rest from the run), and data
errors that name their file or variable.

Issue 23: a table of hostile command lines for what was added since (dataset spec strings, residual
declarations, calibrate, lr-find, thread options, 100-class runs, run names, resume, export), each run
as a real process: a one-line error or a correct result, never a traceback, a hang or a changed file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cifarlab import checkpoints as ckpts
from cifarlab import report, visualize
from cifarlab.cli import main as cli_main
from cifarlab.data import CIFAR10
from cifarlab.devices import DeviceError, available, resolve_device
from cifarlab.fsutil import atomic_write_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _err(args, capsys) -> str:
    code = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


@pytest.fixture(scope="module")
def folder(cifar, tmp_path_factory) -> Path:
    """500 real training and 100 test images as an image folder, for the CLI."""
    from conftest import write_image_folder

    small = CIFAR10(train=cifar.train.subset(slice(0, 500)), test=cifar.test.subset(slice(0, 100)),
                    classes=cifar.classes, root=cifar.root)
    return write_image_folder(small, tmp_path_factory.mktemp("data") / "small")


def _train(folder: Path, runs: Path, *extra) -> list[str]:
    return ["train", "--dataset", f"folder:{folder}", "--runs-dir", str(runs), "--batch-size", "50", "--epochs", "1",
            "--no-progress", "--threads", "1", *extra]


# ---------------------------------------------------------------------------------------------------
# Case 8: --device


def test_device_names_that_do_not_exist_here(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and "cpu" in available()
    with pytest.raises(DeviceError, match=r"^--device 'nonsense': not a device name; available here: cpu"):
        resolve_device("nonsense")
    with pytest.raises(DeviceError, match=r"^--device meta: cifarlab runs on cpu, cuda, mps"):
        resolve_device("meta")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(DeviceError, match=r"^--device cuda: this PyTorch \(.*\) is a CPU-only build without CUDA; "
                                          r"available here: cpu\.$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match=r"^--device cuda:1: no CUDA GPU is visible"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"^--device cuda:2: there are 2 CUDA GPUs here"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_errors_are_one_line_and_leave_nothing(folder, trained_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    for device in ("nonsense", "cuda", "cuda:1"):
        err = _err(_train(folder, runs, "--name", "d", "--device", device), capsys)
        assert f"--device {device!r}" in err or f"--device {device}" in err
        assert "available here: cpu" in err
    assert not runs.exists()
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for device in ("nonsense", "cuda"):
        err = _err(["evaluate", run, "--device", device, "--no-download"], capsys)
        assert "available here: cpu" in err
        assert not (run / "eval").exists()  # before: an empty eval/ was left behind
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert "available here: cpu" in _err(["predict", run, image, "--device", "cuda"], capsys)


# ---------------------------------------------------------------------------------------------------
# Case 9: report over a malformed eval/results.json


def _quick(method="default", **overrides):
    return visualize.StimulusSettings.for_method(method, **dict(overrides, steps=4))


@pytest.mark.parametrize("results", [
    [], {"accuracy": "high"}, {"accuracy": 0.5, "loss": 1.0, "num_images": 500, "classes": "airplane",
                               "per_class_accuracy": [], "checkpoint": "x"}], ids=["list", "wrong-types", "wrong-shape"])
def test_stored_results_of_the_wrong_shape_are_recomputed_not_rendered(trained_run, tmp_path, results):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval").mkdir()
    for name in report.EVAL_PNGS:
        (run / "eval" / name).write_bytes(b"png")
    ckpt = ckpts.load_checkpoint(run)
    (run / "eval" / "results.json").write_text(json.dumps(results))
    stored, why = report._stored_results(run / "eval" / "results.json", ckpt)
    assert stored is None and why.startswith("unusable (") and "Traceback" not in why


def test_report_recomputes_a_malformed_results_json(trained_run, cifar, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    small = CIFAR10(train=cifar.train.subset(slice(0, 10)), test=cifar.test.subset(slice(0, 300)),
                    classes=cifar.classes, root=cifar.root)
    report.build_report(run, data=small, log=lambda *a: None, settings=_quick("exercise"), images=[5],
                        explanations=False)
    good = json.loads((run / "eval" / "results.json").read_text())
    (run / "eval" / "results.json").write_text(json.dumps(dict(good, per_class_accuracy=[0.5] * 10)))
    logged = []
    path = report.build_report(run, data=small, log=logged.append, settings=_quick("exercise"), images=[5],
                               explanations=False)
    assert path.exists()  # before: AttributeError after rendering
    assert any("'per_class_accuracy' must be an object, not a list" in line and "evaluating" in line
               for line in logged), logged
    assert json.loads((run / "eval" / "results.json").read_text())["per_class_accuracy"] == good["per_class_accuracy"]
    # Stale: the checkpoint's weights changed since (a resumed run), the path did not.
    (run / "eval" / "results.json").write_text(json.dumps(dict(good, weights_sha256="0" * 64)))
    ckpt = ckpts.load_checkpoint(run)
    assert report._stored_results(run / "eval" / "results.json", ckpt)[1].startswith("is for other weights")


# ---------------------------------------------------------------------------------------------------
# Case 10: --name


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", "..", ".hidden", " "])
def test_cli_names_outside_the_runs_dir_are_refused(folder, tmp_path, name, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    err = _err(_train(folder, runs, "--name", name), capsys)
    assert "is not allowed: " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere (not even runs/)


# ---------------------------------------------------------------------------------------------------
# Case 11: the Ctrl-C hint works as printed; --resume alone continues the stored run


def test_ctrl_c_hint_is_a_command_that_works(folder, tmp_path):
    runs = tmp_path / "my runs"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = ["train", "--preset", "fast", "--dataset", f"folder:{folder}", "--train-subset", "300", "--epochs", "30",
            "--batch-size", "50", "--runs-dir", str(runs), "--name", "sig", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("Epoch 2/30"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    hint = next(line for line in out.splitlines() if "Continue with: " in line).split("Continue with: ")[1]
    # Before: "cifarlab train --name sig --resume" (no --preset, --train-subset, --runs-dir): it failed.
    assert hint == f"cifarlab train --name sig --runs-dir {shlex.quote(str(runs))} --threads 1 --resume"
    command = shlex.split(hint)
    assert command[0] == "cifarlab"
    done = subprocess.run([sys.executable, "-m", "cifarlab", *command[1:], "--max-steps", "3"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and "training fast" in done.stdout and "300 images" in done.stdout


def test_resume_alone_uses_the_stored_declaration_even_when_the_file_is_gone(folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    decl = tmp_path / "net.json"
    decl.write_text(json.dumps({"name": "mine", "layers": [{"type": "conv", "filters": 4}, {"type": "relu"},
                                                           {"type": "global_avgpool"}, {"type": "dense", "units": 10}]}))
    assert cli_main(_train(folder, runs, "--name", "m", "--model", str(decl), "--train-subset", "200",
                           "--max-steps", "2")) == 0
    decl.unlink()
    capsys.readouterr()
    assert cli_main(["train", "--name", "m", "--runs-dir", str(runs), "--resume", "--max-steps", "1",
                     "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "training mine" in out and "200 images" in out
    # An option given with --resume that differs from the run's is named, not silently used.
    err = _err(["train", "--name", "m", "--runs-dir", runs, "--resume", "--lr", "0.5", "--no-progress"], capsys)
    assert "different recipe {'lr': (0.005, 0.5)}" in err


# ---------------------------------------------------------------------------------------------------
# Case 12: data errors that name their file or variable


def test_a_fake_python_version_is_not_called_verified(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [0] * 2, b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    err = _err(["data", "--data-dir", root, "--no-download"], capsys)  # before: "all files match their md5"
    assert str(root) in err and "md5" in err


def test_an_explicit_archive_is_used_or_refused_never_replaced_by_the_cache(tmp_path, capsys, data_dir):
    fake = tmp_path / "random.tar.gz"
    fake.write_bytes(os.urandom(4096))
    err = _err(["data", "--data-dir", fake, "--no-download"], capsys)
    assert str(fake) in err


def test_cifarlab_cache_that_is_a_file_is_named(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    err = _err(["data", "--no-download"], capsys)
    assert f"CIFARLAB_CACHE={cache} is not a folder" in err


def test_a_full_disk_error_names_the_file(tmp_path, capsys):
    target = tmp_path / "metrics.csv"
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, previous[1]))
    try:
        with pytest.raises(OSError) as info:
            atomic_write_bytes(target, b"x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.filename == str(target) and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# Issue 23: hostile command lines for the surface added since issue 14, each a real process


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple
    says: str  # in the one-line error (exit 2), or in the output of a correct result (exit 0)
    code: int = 2
    usage: bool = False  # refused by argparse: its usage lines, then one "error:" line
    creates: tuple = ()  # what a correct result writes (glob patterns in the sandbox)
    env: tuple = ()


QUICK = ("--runs-dir", "runs", "--train-subset", "100", "--max-steps", "1", "--no-progress", "--threads", "1",
         "--no-download")
_CONV = {"type": "conv", "filters": 8}
_HEAD = [{"type": "global_avgpool"}, {"type": "dense", "units": "classes"}]


def _nested(depth: int) -> dict:
    block = {"type": "residual", "body": [_CONV]}
    for _ in range(depth):
        block = {"type": "residual", "body": [block]}
    return block


DECLARATIONS = {
    "res_ok.json": [_CONV, {"type": "residual", "body": [_CONV, {"type": "relu"}, _CONV]}, {"type": "relu"}, *_HEAD],
    "res_shapes.json": [_CONV, {"type": "residual", "body": [{"type": "conv", "filters": 16}]}, *_HEAD],
    "res_deep.json": [_CONV, _nested(50), *_HEAD],
    "res_empty.json": [_CONV, {"type": "residual", "body": []}, *_HEAD],
    "res_typo.json": [_CONV, {"type": "residual", "body": [_CONV], "shorcut": []}, *_HEAD],
    "res_huge.json": [_CONV, {"type": "residual", "body": [{"type": "conv", "filters": 100_000}],
                              "shortcut": [{"type": "conv", "filters": 100_000}]}, *_HEAD],
    "res_many.json": [_CONV] + [{"type": "residual", "body": [_CONV]}] * 5000 + _HEAD,
    "head10.json": [_CONV, {"type": "global_avgpool"}, {"type": "dense", "units": 10}],
}

HOSTILE = [
    # Dataset spec strings
    Case("spec-argument", ("train", "--dataset", "cifar10:foo", *QUICK), "dataset 'cifar10' takes no ':foo' argument"),
    Case("spec-labels", ("train", "--dataset", "cifar100:coarse:x", *QUICK), "'fine' or 'coarse', not 'coarse:x'"),
    Case("spec-colon", ("train", "--dataset", ":", *QUICK), "unknown dataset ''"),
    Case("spec-folder-empty", ("train", "--dataset", "folder:", *QUICK), "the folder dataset needs a path"),
    Case("spec-folder-file", ("train", "--dataset", "folder:notes.txt", *QUICK), "folder:notes.txt: no such folder"),
    Case("spec-eval-only", ("train", "--dataset", "cifar10.1", *QUICK), "CIFAR-10.1 not found"),
    Case("spec-on", ("evaluate", "run", "--on", "cifar10:x", "--no-download"), "takes no ':x' argument"),
    # 100 classes
    Case("cifar100-missing", ("train", "--dataset", "cifar100", *QUICK), "CIFAR-100 not found"),
    Case("head-100", ("summary", "--model", "decl/head10.json", "--classes", "100"),
         "expected (100,) for 100 classes"),
    # Residual declarations
    Case("res-ok", ("summary", "--model", "decl/res_ok.json"), "Total params", code=0),
    Case("res-shapes", ("summary", "--model", "decl/res_shapes.json"), "the two must have the same shape to be added"),
    Case("res-train", ("train", "--model", "decl/res_shapes.json", *QUICK), "must have the same shape to be added"),
    Case("res-deep", ("summary", "--model", "decl/res_deep.json"), "residual blocks nested more than 8 deep"),
    Case("res-empty", ("summary", "--model", "decl/res_empty.json"), "'body' must be a non-empty list of layers"),
    Case("res-typo", ("summary", "--model", "decl/res_typo.json"), "unknown key(s) ['shorcut']"),
    Case("res-huge", ("summary", "--model", "decl/res_huge.json"), "'filters' = 100000 is outside 1..8192"),
    Case("res-many", ("summary", "--model", "decl/res_many.json"), "layers is more than the 512 allowed"),
    # calibrate
    Case("calibrate-no-holdout", ("calibrate", "run", "--no-download"), "no held-out training images"),
    Case("calibrate-folder", ("calibrate", "run/checkpoints", "--no-download"), "no checkpoint there"),
    Case("calibrate-file", ("calibrate", "notes.txt"), "notes.txt: not a valid safetensors file"),
    Case("calibrate-tta", ("calibrate", "run", "--tta-level", "3"), "3 is outside 0..2", usage=True),
    # lr-find
    Case("lr-range", ("lr-find", "--start-lr", "1", "--end-lr", "0.1"), "--start-lr (1) must be below --end-lr (0.1)"),
    Case("lr-nan", ("lr-find", "--start-lr", "nan"), "nan is outside", usage=True),
    Case("lr-out-file", ("lr-find", "--preset", "fast", "--steps", "3", "--batch-size", "8", "--threads", "1",
                         "--out", "notes.txt", "--no-download"), "notes.txt"),
    # Thread options
    Case("threads-zero", ("train", "--threads", "0"), "--threads: 0 is outside 1..1024", usage=True),
    Case("threads-huge", ("lr-find", "--threads", "99999"), "--threads: 99999 is outside 1..1024", usage=True),
    Case("world-size", ("train", "--name", "w", *QUICK), "WORLD_SIZE='two' in the environment is not a whole number",
         env=(("WORLD_SIZE", "two"),)),
    Case("threads-fixed-wins", ("train", "--name", "t", "--adaptive-threads", *QUICK), "1 threads, ", code=0,
         creates=("runs", "runs/t", "runs/t/*", "runs/t/checkpoints/*", "runs/t/checkpoints/*/*")),
    # Run names, resume, export
    Case("name-empty", ("train", "--name", "", "--preset", "fast", *QUICK), "run folder: runs/fast-", code=0,
         creates=("runs", "runs/fast-*", "runs/fast-*/*", "runs/fast-*/checkpoints/*", "runs/fast-*/checkpoints/*/*")),
    Case("resume-typo", ("train", "--name", "typo", "--resume", *QUICK), "there is no run 'typo' in runs to continue"),
    Case("export-nested", ("export", "run", "--out", "exports/a/b/m.onnx"), "wrote exports/a/b/m.onnx", code=0,
         creates=("exports", "exports/a", "exports/a/b", "exports/a/b/m.onnx")),
    Case("export-into-folder", ("export", "run", "--out", "into/"), "wrote into/model.onnx", code=0,
         creates=("into", "into/model.onnx")),
    Case("export-final", ("export", "run", "--out", "run/final"), "inside the checkpoint folder"),
    Case("export-checkpoints", ("export", "run", "--out", "run/checkpoints/x.onnx"), "keeps its own checkpoints"),
    Case("export-run-file", ("export", "run", "--out", "run/metrics.csv", "--force"), "keeps its own files"),
    Case("export-through-file", ("export", "run", "--out", "notes.txt/x.onnx"), "notes.txt is not a folder"),
]


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its size and content hash (files) or kind: what must not change."""
    import hashlib

    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() or not path.is_file():
            found[rel] = ("dir" if path.is_dir() else "other",)
        else:
            found[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _run_case(case: Case, sandbox: Path, env: dict) -> dict:
    try:
        done = subprocess.run([sys.executable, "-m", "cifarlab", *case.argv], capture_output=True, text=True,
                              cwd=sandbox, env=dict(env, **dict(case.env)), timeout=180)
    except subprocess.TimeoutExpired as e:
        return {"code": "timeout", "out": str(e.stdout), "err": str(e.stderr)}
    return {"code": done.returncode, "out": done.stdout, "err": done.stderr}


@pytest.fixture(scope="module")
def hostile(trained_run, data_dir, tmp_path_factory):
    """Every case of HOSTILE run as its own process (two at a time) in one sandbox: a copy of a trained
    run, hostile declarations and a plain file. Gives the results by id and the sandbox before and after."""
    sandbox = tmp_path_factory.mktemp("hostile")
    shutil.copytree(trained_run, sandbox / "run")
    (sandbox / "decl").mkdir()
    for name, layers in DECLARATIONS.items():
        (sandbox / "decl" / name).write_text(json.dumps({"layers": layers}))
    (sandbox / "notes.txt").write_text("a file of the user's")
    env = dict(os.environ, CIFARLAB_DATA=str(data_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    before = _tree(sandbox)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((c.id for c in HOSTILE), pool.map(lambda c: _run_case(c, sandbox, env), HOSTILE)))
    return SimpleNamespace(results=results, before=before, after=_tree(sandbox), root=sandbox)


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_command_line_gives_one_line_error_or_correct_result(hostile, case):
    result = hostile.results[case.id]
    err, out = result["err"], result["out"]
    assert result["code"] == case.code, f"{case.argv}: exit {result['code']}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err + out, err
    if case.code == 0:
        assert case.says in out, out[-2000:]
    elif case.usage:  # argparse: usage, then "cifarlab CMD: error: argument ...: why"
        assert err.splitlines()[-1].startswith("cifarlab ") and case.says in err.splitlines()[-1], err
    else:
        assert err.startswith("error: ") and err.count("\n") == 1 and case.says in err, err


def test_hostile_command_lines_change_no_file_and_write_only_their_results(hostile):
    before, after = hostile.before, hostile.after
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or lost: {changed}"
    created = set(after) - set(before)
    allowed = [pattern for case in HOSTILE for pattern in case.creates]
    unexpected = sorted(p for p in created if not any(Path(p).match(pattern) and
                                                      len(Path(p).parts) == len(Path(pattern).parts)
                                                      for pattern in allowed))
    assert not unexpected, f"written by a refused command: {unexpected}"
    for case in HOSTILE:
        for pattern in case.creates:
            assert any(Path(p).match(pattern) for p in created), f"{case.id} did not write {pattern}"


def test_exports_through_new_folders_are_real_models(hostile, trained_run):
    from cifarlab.export import compare_with_torch

    ckpt = ckpts.load_checkpoint(trained_run)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for rel in ("exports/a/b/m.onnx", "into/model.onnx"):
        check = compare_with_torch(hostile.root / rel, ckpt, images)
        assert check["same_predictions"] and check["max_abs_logit_diff"] < 1e-3


def _fast(runs: Path, data_dir: Path, name: str, *extra) -> list[str]:
    return ["train", "--preset", "fast", "--train-subset", "300", "--epochs", "2", "--runs-dir", str(runs),
            "--data-dir", str(data_dir), "--name", name, "--no-progress", "--threads", "1", *extra]


def test_the_first_command_with_resume_added_continues_the_run(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    first = _fast(runs, data_dir, "p", "--max-steps", "2")
    assert cli_main(first) == 0
    assert "the preset's budget for 300 training images: batch 256 -> 32" in capsys.readouterr().out
    err = _err(first, capsys)  # the same command again: the folder is taken, and the hint says --resume
    assert "Pass --resume to continue the run there" in err
    # Before: refused as "a different recipe {'batch_size': (32, 256), 'lr': ...}": the budget that fitted the
    # preset to 300 images was not applied to the resumed command's preset.
    assert cli_main([*first, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "300 images, batch 32" in out and "the preset's budget" not in out


def test_a_run_killed_before_its_first_checkpoint_resumes_its_own_recipe_and_data(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli_main(_fast(runs, data_dir, "k", "--max-steps", "1", "--val-split", "100")) == 0
    shutil.rmtree(runs / "k" / "checkpoints")  # what a SIGKILL before the first checkpoint leaves: recipe, dataset
    recipe = (runs / "k" / "recipe.json").read_bytes()
    capsys.readouterr()
    # Before: `--name k --resume` started the default recipe (exercise, 50,000 images, 10 epochs) and
    # replaced recipe.json with it.
    assert cli_main(["train", "--name", "k", "--runs-dir", str(runs), "--data-dir", str(data_dir), "--resume",
                     "--max-steps", "1", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "starting from scratch" in out and "training fast" in out and "200 images" in out, out
    assert "100 images held out" in out and (runs / "k" / "recipe.json").read_bytes() == recipe
    # A damaged recipe.json is named, not trained with.
    shutil.rmtree(runs / "k" / "checkpoints")
    for text, why in (('{"epochs": "two"}', "epochs must be int"), ("[1, 2]", "expected a JSON object"),
                      ("{", "")):
        (runs / "k" / "recipe.json").write_text(text)
        err = _err(["train", "--name", "k", "--runs-dir", runs, "--resume", "--no-progress"], capsys)
        assert "recipe.json" in err and why in err
        assert (runs / "k" / "recipe.json").read_text() == text and not (runs / "k" / "checkpoints").exists()


def test_export_into_final_of_an_unfinished_run_is_refused_and_the_run_still_finishes(data_dir, tmp_path, capsys):
    pytest.importorskip("onnx")
    runs = tmp_path / "runs"
    run = runs / "u"
    assert cli_main(_fast(runs, data_dir, "u", "--epochs", "1", "--val-split", "100", "--max-steps", "2")) == 0
    assert not (run / "final").exists()
    # Before: written as a file named final, so the resumed run failed to save its final model.
    for out, why in ((run / "final", "keeps its own checkpoints"), (run / "final" / "m.onnx", "keeps its own checkpoints"),
                     (run / "checkpoints", "keeps its own checkpoints"), (run / "recipe.json", "already exists")):
        assert why in _err(["export", run, "--out", out, "--no-verify"], capsys)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "dataset.json", "recipe.json"]
    assert cli_main(_fast(runs, data_dir, "u", "--epochs", "1", "--val-split", "100", "--resume")) == 0
    assert ckpts.load_checkpoint(run / "final").meta["epoch"] == 1
    assert "inside the checkpoint folder" in _err(["export", run, "--out", run / "final", "--no-verify"], capsys)
    assert cli_main(["export", str(run), "--no-verify"]) == 0 and (run / "model.onnx").is_file()


def test_the_resume_hint_of_a_torchrun_run_names_torchrun(monkeypatch):
    from cifarlab.cli import build_parser
    from cifarlab.cli.args import run_options_from_args
    from cifarlab.cli.train import resume_command

    args = build_parser().parse_args(["train", "--name", "", "--runs-dir", "my runs", "--threads", "2"])
    options = run_options_from_args(args)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(args, options, "fast-1") == \
        "torchrun --nproc_per_node=4 -m cifarlab train --name fast-1 --runs-dir 'my runs' --threads 2 --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(args, options, "r").startswith("torchrun --nnodes=2 --nproc_per_node=2 -m cifarlab train")
    monkeypatch.delenv("WORLD_SIZE")
    assert resume_command(args, options, "r") == "cifarlab train --name r --runs-dir 'my runs' --threads 2 --resume"
