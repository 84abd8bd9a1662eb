"""Issue 14, cases 8-12 on the command line: one-line errors instead of tracebacks or nonsense.

--device that does not exist, a report over a malformed results.json, --name that would leave
--runs-dir, a Ctrl-C hint that works as printed (``--resume`` takes the rest from the run), and data
errors that name their file or variable.
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", "..", ".hidden", ""])
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
