"""Issue 14, cases 1-4, 6 and 10: runs never destroy each other, and resume continues only what it can.

Real ``cifarlab`` processes (two trainings on one folder, a SIGKILLed owner) on a small dataset in
CIFAR-10's python layout (1,000 real training images, 100 test images): a run is a few seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cifarlab import checkpoints as ckpts
from cifarlab import rundir
from cifarlab.cli import main as cli_main
from cifarlab.data import CIFAR10, Split
from cifarlab.data.cifar10 import read_bin, read_class_names
from cifarlab.errors import CheckpointError
from cifarlab.memory import MemoryBudgetError, estimate
from cifarlab.models import Net
from cifarlab.train import recipe_from, train

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False, "log": lambda *a, **k: None}
TRIALS = int(os.environ.get("CIFARLAB_CONCURRENCY_TRIALS", "4"))


@pytest.fixture(scope="module")
def small(data_dir) -> CIFAR10:
    x, y = read_bin(data_dir / "data_batch_1.bin")
    xt, yt = read_bin(data_dir / "test_batch.bin")
    return CIFAR10(train=Split(torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000].astype(np.int64))),
                   test=Split(torch.from_numpy(xt[:100]), torch.from_numpy(yt[:100].astype(np.int64))),
                   classes=read_class_names(data_dir / "batches.meta.txt"), root=data_dir)


@pytest.fixture(scope="module")
def folder(small, tmp_path_factory) -> Path:
    """The small dataset as an image folder (PNG, lossless), for the CLI: ``--dataset folder:PATH``."""
    from conftest import write_image_folder

    return write_image_folder(small, tmp_path_factory.mktemp("data") / "small-folder")


def _args(folder: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--dataset", f"folder:{folder}", "--runs-dir", str(runs), "--name", name, "--batch-size", "50",
            "--epochs", "1", "--no-progress", "--threads", "1", *extra]


def _proc(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _run_is_seed(run: Path, seed: int, epochs: int = 2) -> None:
    """Every file of the run belongs to the run trained with ``seed``, and all of it loads."""
    assert json.loads((run / "recipe.json").read_text())["seed"] == seed
    final = ckpts.load_checkpoint(run / "final")
    assert final.meta["recipe"]["seed"] == seed and final.meta["epoch"] == epochs
    for folder in ckpts.checkpoint_dirs(run):
        assert ckpts.load_checkpoint(folder, with_train_state=True).train_state["recipe"]["seed"] == seed
    assert len((run / "metrics.csv").read_text().splitlines()) == epochs + 1
    assert not (run / rundir.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------
# Case 1: two trainings in one run folder


EPOCHS = 3
MODES = ["together", "after-lock", "after-first-checkpoint", "after-finish"]


def test_two_trainings_in_one_folder_never_destroy_each_other(folder, tmp_path):
    """Before: both exited 0 and every file was the second run's. Now the second is refused (exit 2,
    "in use by PID N" or "not empty") and the first run's files are intact, in every trial."""
    outcomes = []
    for trial in range(TRIALS):
        mode = MODES[trial % len(MODES)]
        runs = tmp_path / f"trial{trial}"
        run = runs / "conc"
        extra = ("--epochs", str(EPOCHS), "--checkpoint-every", "2")
        first = _proc(_args(folder, runs, "conc", "--seed", "1", *extra))
        if mode == "after-lock":
            _wait(lambda: rundir.lock_holder(run) == f"PID {first.pid}", first, "the lock")
        elif mode == "after-first-checkpoint":
            _wait(lambda: ckpts.checkpoint_dirs(run), first, "the first checkpoint")
        elif mode == "after-finish":
            first.wait(120)
        second = _proc(_args(folder, runs, "conc", "--seed", "2", *extra))
        out = {p: p.communicate(timeout=300) for p in (first, second)}
        codes = sorted(p.returncode for p in (first, second))
        assert codes == [0, 2], (mode, {p.pid: (p.returncode, out[p][1]) for p in out})
        winner, loser = (first, second) if first.returncode == 0 else (second, first)
        err = out[loser][1]
        # Refused by the lock while the owner runs, or (when the owner finished first) because the folder
        # is not empty; the message names the owner's PID or what the folder holds.
        assert err == f"error: run folder {run} is in use by PID {winner.pid}; wait for it to finish (or stop it), " \
                      f"or choose another --name.\n" or \
            re.fullmatch(rf"error: {re.escape(str(run))} is not empty \(it holds checkpoints, [^)]*\); a new run never "
                         rf"writes into an existing folder\. Pass --resume to continue the run there, or choose "
                         rf"another --name\.\n", err), (mode, err)
        if mode != "together":
            assert winner is first
        before = _snapshot(run)
        _run_is_seed(run, 1 if winner is first else 2, epochs=EPOCHS)
        assert _snapshot(run) == before
        outcomes.append((mode, "in use" if "in use" in err else "not empty"))
    print("concurrent-run outcomes:", outcomes)
    assert len(outcomes) == TRIALS and any(o == "in use" for _, o in outcomes)
    if TRIALS >= len(MODES):
        assert ("after-finish", "not empty") in outcomes


def test_a_sigkilled_owner_leaves_no_stale_lock(folder, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "k"
    owner = _proc(_args(folder, runs, "k", "--epochs", "50", "--checkpoint-every", "3"))
    _wait(lambda: ckpts.checkpoint_dirs(run), owner, "a checkpoint")
    assert rundir.lock_holder(run) == f"PID {owner.pid}"
    owner.send_signal(signal.SIGKILL)
    owner.wait(60)
    assert (run / rundir.LOCK_FILE).read_text().strip() == str(owner.pid)  # the file stays, the lock does not
    assert rundir.lock_holder(run) is None
    resumed = subprocess.run([sys.executable, "-m", "cifarlab", *_args(folder, runs, "k", "--epochs", "50",
                                                                       "--resume", "--max-steps", "2")],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and not (run / rundir.LOCK_FILE).exists()


def test_the_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cifarlab.rundir import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.RunFolderError, match=f"run folder {run} is in use by PID {holder.pid}"):
            with rundir.RunLock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert rundir.lock_holder(run) is None  # the killed holder's lock went with it
    fresh = tmp_path / "fresh"
    with rundir.RunLock(fresh), rundir.RunLock(fresh):  # re-entrant: `run` holds it around training and report
        assert rundir.lock_holder(fresh) == f"PID {os.getpid()}"
    assert not fresh.exists()  # created for the lock, nothing written: removed again


def test_a_run_folder_that_is_a_file_or_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for path in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(rundir.RunFolderError, match="exists and is not a folder"):
            with rundir.RunLock(path):
                pass
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------------
# Case 2: a folder with final/ but no checkpoints/


def test_a_folder_holding_an_imported_model_is_never_trained_over(folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    from cifarlab.models import get_declaration
    from cifarlab.transforms import Normalization

    net = Net(get_declaration("exercise"))
    meta = {"architecture": net.declaration, "classes": sorted(p.name for p in (folder / "train").iterdir()),
            "normalization": Normalization.named("exercise").to_dict(), "recipe": {"tta": 0, "seed": 0},
            "epoch": None, "source": {"file": "good.h5"}}
    ckpts.save_checkpoint(runs / "kx" / "final", net, meta)  # what `import-keras --out runs/kx` writes
    before = _snapshot(runs / "kx")
    assert cli_main(_args(folder, runs, "kx")) == 2
    assert f"{runs / 'kx'} is not empty (it holds final); a new run never writes into an existing folder" \
        in capsys.readouterr().err
    assert cli_main(_args(folder, runs, "kx", "--resume")) == 2
    assert f"{runs / 'kx'}: nothing to resume (no training checkpoint in {runs / 'kx' / 'checkpoints'}), and the " \
           f"folder holds final, which is not a run's" in capsys.readouterr().err
    assert _snapshot(runs / "kx") == before


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(small, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("{}")  # what a run writes before its first checkpoint
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".step-000000004.abc.tmp").mkdir()
    result = train(recipe_from("exercise", epochs=1, batch_size=100), small, run, resume=True, max_steps=2, **QUIET)
    assert result.history == [] and ckpts.checkpoint_dirs(run)


# ---------------------------------------------------------------------------------------------------
# Case 3: export never overwrites, resume never deletes foreign files


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    assert cli_main(_args(folder, runs, "done", "--train-subset", "300")) == 0
    return runs / "done"


def test_export_never_writes_into_a_checkpoint_or_over_a_file(finished, tmp_path, capsys):
    pytest.importorskip("onnx")
    before = _snapshot(finished)
    final = finished / "final"
    for out, words in ((final / "model.safetensors", "inside the checkpoint folder"),
                       (final / "model.onnx", "inside the checkpoint folder"),
                       (ckpts.checkpoint_dirs(finished)[0] / "x.onnx", "inside the checkpoint folder"),
                       (finished / "metrics.csv", "metrics.csv already exists; not replacing it")):
        assert cli_main(["export", str(final), "--out", str(out), "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert _snapshot(finished) == before
    ckpts.load_checkpoint(final)


def test_resume_keeps_foreign_files_in_final(folder, finished, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(finished, runs / "done")
    final = runs / "done" / "final"
    (final / "model.onnx").write_bytes(b"an export the user put here")
    (final / "notes").mkdir()
    (final / "notes" / "n.txt").write_text("keep me")
    assert cli_main(_args(folder, runs, "done", "--train-subset", "300", "--resume")) == 0
    assert (final / "model.onnx").read_bytes() == b"an export the user put here"
    assert (final / "notes" / "n.txt").read_text() == "keep me"
    ckpts.load_checkpoint(final)


# ---------------------------------------------------------------------------------------------------
# Case 4: resume continues exactly the run it was started as, or names the difference


def test_resume_continues_on_the_runs_own_subset_or_refuses(folder, small, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli_main(_args(folder, runs, "s", "--train-subset", "500", "--max-steps", "3")) == 0
    capsys.readouterr()
    # Before: resumed without --train-subset, it trained on all 1,000 images with a jumped schedule. Now
    # --resume takes the subset from the run, and a different one is refused, naming the difference.
    assert cli_main(_args(folder, runs, "s", "--resume", "--max-steps", "2")) == 0
    assert "; 500 images, batch 50" in capsys.readouterr().out
    assert cli_main(_args(folder, runs, "s", "--resume", "--train-subset", "800")) == 2
    err = capsys.readouterr().err
    assert "data train_subset 'first 500' (saved) vs 'first 800' (now)" in err
    assert "data train_images 500 (saved) vs 800 (now)" in err and "data train_sha256" in err
    with pytest.raises(CheckpointError, match=r"data train_images 500 \(saved\) vs 1000 \(now\)"):
        train(recipe_from("exercise", epochs=1, batch_size=50), small, runs / "s", resume=True, **QUIET)


def _declaration(path: Path, activation: str = "relu", filters: int = 8) -> Path:
    path.write_text(json.dumps({"name": "mine", "layers": [
        {"type": "conv", "filters": filters, "name": "conv"}, {"type": activation, "name": "act"},
        {"type": "global_avgpool"}, {"type": "dense", "units": 10}]}))
    return path


def test_an_edited_declaration_file_is_not_resumed_silently(folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    decl = _declaration(tmp_path / "net.json")
    args = _args(folder, runs, "d", "--model", str(decl))
    assert cli_main(args + ["--max-steps", "3"]) == 0
    capsys.readouterr()
    _declaration(decl, activation="tanh")  # before: resumed silently with another architecture
    assert cli_main(args + ["--resume"]) == 2
    assert "model layer 1 'act': type 'relu' vs 'tanh' (saved vs now)" in capsys.readouterr().err
    _declaration(decl, filters=16)  # before: a load_state_dict traceback
    assert cli_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "model layer 0 'conv': filters 8 vs 16 (saved vs now)" in err and "Traceback" not in err
    # The same content at another path is the same model.
    moved = _declaration(tmp_path / "moved.json")
    decl.unlink()
    assert cli_main(_args(folder, runs, "d", "--model", str(moved), "--resume", "--max-steps", "2")) == 0


def test_resume_with_another_registered_model_names_it(small, tmp_path):
    run = tmp_path / "r"
    train(recipe_from("exercise", epochs=1, batch_size=100), small, run, max_steps=2, **QUIET)
    with pytest.raises(CheckpointError, match=r"different recipe \{'model': \('exercise', 'fast'\)\} .*model layer 0"):
        train(recipe_from("exercise", model="fast", epochs=1, batch_size=100), small, run, resume=True, **QUIET)


# ---------------------------------------------------------------------------------------------------
# Case 6: activation memory is bounded before anything is allocated


BOMB = {"name": "bomb", "layers": [{"type": "conv", "filters": 8192, "kernel": 1}] + [{"type": "relu"}] * 400
        + [{"type": "global_avgpool"}, {"type": "dense", "units": 10}]}


def test_a_small_declaration_with_huge_activations_is_refused_with_the_number(folder, small, tmp_path, capsys):
    path = tmp_path / "bomb.json"
    path.write_text(json.dumps(BOMB))
    assert path.stat().st_size < 8000
    est = estimate(json.loads(path.read_text()), 256)
    assert est.params == 114_698 and est.values_per_image == 401 * 8192 * 32 * 32 + 8192 + 10 + 3072
    runs = tmp_path / "runs"
    assert cli_main(_args(folder, runs, "bomb", "--model", str(path), "--batch-size", "256")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'bomb' with batch size 256 needs about 3.1 TiB for training "
                          "(3,363,843,082 activation values per image; the largest layer, 'conv_1', outputs 8,388,608), "
                          "more than the "), err
    assert not runs.exists()  # refused before the folder, the data on the device or the model existed
    with pytest.raises(MemoryBudgetError, match="Even batch size 1 would not fit"):
        from cifarlab.memory import check_fits
        check_fits(BOMB, 1, "cpu", available=1 << 30)


def test_inference_on_a_hostile_architecture_is_bounded_too(monkeypatch):
    """A checkpoint can hold the same declaration: evaluate/predict refuse before the first batch."""
    from cifarlab import memory
    from cifarlab.evaluate import predict_logits
    from cifarlab.transforms import Normalization

    monkeypatch.setattr(memory, "available_bytes", lambda device: (1 << 30, "available memory"))
    with pytest.raises(MemoryBudgetError, match=r"^model 'bomb' with batch size 128 needs about 8\.0 GiB for "
                                                r"inference .* more than the 1\.0 GiB available memory on cpu"):
        predict_logits(Net(BOMB), torch.zeros(200, 3, 32, 32, dtype=torch.uint8), Normalization.named("exercise"))


def test_ordinary_runs_fit(small):
    from cifarlab.memory import check_fits
    from cifarlab.models import MODELS

    for name, decl in MODELS.items():  # every built-in fits 8 GiB at batch 1024 (check_fits does not refuse it)
        est = check_fits(decl, 1024, "cpu", available=8 << 30)
        if name in ("exercise", "fast", "airbench94"):  # the small ones: well under 2 GiB
            assert est.training_bytes < 2 << 30, name


# ---------------------------------------------------------------------------------------------------
# Case 10: run names


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", ".", "", ".hidden", "x\x00y", "-rf",
                                  " padded", "tab\there", "a\\b", "~", "x" * 200, "line\nbreak", "\u202eevil"])
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(rundir.RunFolderError, match="is not allowed: "):
        rundir.check_run_name(name)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=40))
def test_an_accepted_name_is_exactly_one_folder_inside_runs_dir(name):
    try:
        rundir.check_run_name(name)
    except rundir.RunFolderError:
        return
    runs = Path("/runs")
    path = runs / name
    assert path.parent == runs and path.name == name and os.path.normpath(path) == str(path)
    assert not name.startswith(".") and "/" not in name
