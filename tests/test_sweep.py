"""``cifarlab sweep``: the search space is checked like every file the tool reads, a trial is a normal run
folder that a pruner may stop after an epoch, and a sweep killed mid-way resumes from its storage without
repeating finished trials (real processes, real SQLite storage, real CIFAR-10 images)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlab import checkpoints as ckpts
from cifarlab.cli import main as cli_main
from cifarlab.data import CIFAR10
from cifarlab.recipes import recipe_from
from cifarlab.sweep import SweepError, build_space, load_space, parse_param

pytestmark = pytest.mark.usefixtures("one_thread")

optuna = pytest.importorskip("optuna")

# 400 training and 200 held-out images, 3 epochs of 8 steps: a few seconds per trial on one thread.
TINY = ["--preset", "fast", "--train-subset", "600", "--val-split", "200", "--epochs", "3", "--batch-size", "50",
        "--threads", "1", "--no-progress", "--no-download"]


def _env(data_dir: Path) -> dict:
    return dict(os.environ, CIFARLAB_DATA=str(data_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _rows(folder: Path) -> dict[int, dict]:
    with open(folder / "trials.csv", newline="") as f:
        return {int(r["trial"]): r for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------------
# The search space


def _bounds(name: str) -> str:
    from dataclasses import fields

    from cifarlab.recipes import Recipe

    lo, hi = next(f for f in fields(Recipe) if f.name == name).metadata["bounds"]
    return f"{lo:g}..{hi:g}"


def test_params_are_typed_and_bounded_by_the_recipe_fields():
    assert parse_param("lr=log:1e-3:1e-1").describe() == "log:0.001:0.1"
    assert parse_param("batch-size=intlog:32:512").name == "batch_size"
    assert parse_param("nesterov=choice:true,false").values == (True, False)
    assert parse_param("optimizer=choice:sgd,adamw").values == ("sgd", "adamw")
    for text, words in [
        ("lr", "expected NAME=KIND:..."),
        ("learning_rate=log:1e-3:1", "'learning_rate' is not a recipe field"),
        ("lrr=log:1e-3:1", "did you mean lr"),
        ("seed=int:0:9", "seed cannot be searched: it also picks the held-out validation images"),
        ("val_split=int:100:200", "val_split cannot be searched"),
        ("lr=int:1:3", "lr is a float field"),
        ("epochs=float:1:3", "epochs is a int field; use int:LOW:HIGH"),
        ("label_smoothing=log:0:0.1", "a log range needs low > 0"),
        ("lr=float:0.5:0.1", "low 0.5 must be below high 0.1"),
        ("lr=log:1e-3:nan", "must be a finite number"),
        ("lr=log:1e-3", "expected log:LOW:HIGH"),
        ("lr=cauchy:1:2", "type 'cauchy' is not one of float, log, int, intlog, choice"),
        ("label_smoothing=float:0:1.5", f"must stay within {_bounds('label_smoothing')} (the recipe field's"),
        ("epochs=int:1:1000000000", "must stay within"),
        ("optimizer=choice:sgd,rmsprop", "optimizer must be one of"),
        ("optimizer=choice:sgd,sgd", "the choices repeat a value"),
        ("optimizer=choice:", "choice needs 1 to 64 values"),
        ("nesterov=choice:maybe", "'maybe' is not a bool value"),
        ("batch_size=choice:32,x", "'x' is not a int value"),
    ]:
        with pytest.raises(SweepError, match=None) as info:
            parse_param(text)
        assert words in str(info.value), (text, str(info.value))


def test_the_space_is_checked_with_the_recipe_at_its_ends():
    base = recipe_from("fast", val_split=100)
    with pytest.raises(SweepError, match=r"muon_lr = 0\.1 the recipe is refused: muon_lr and muon_momentum apply to "
                                         r"the muon optimizer only"):
        build_space(["muon_lr=float:0.1:0.3"], None, base)
    with pytest.raises(SweepError, match="searched twice"):
        build_space(["lr=log:0.01:0.1", "lr=log:0.01:0.2"], None, base)
    with pytest.raises(SweepError, match="nothing to search"):
        build_space([], None, base)
    assert set(build_space(["lr=log:0.01:0.5", "optimizer=choice:sgd"], None, base)) == {"lr", "optimizer"}


@pytest.mark.parametrize("content, words", [
    ('{"params": {"lr": "log:1e-3:1e-1"}, "trials": 5}', "unknown key(s) ['trials']"),
    ('{"params": {}}', 'non-empty "params" object'),
    ('[1, 2]', 'non-empty "params" object'),
    ('{"params": {"lr": {"type": "log", "low": 0.001, "high": 0.1, "step": 2}}}', "unknown key(s) ['step']"),
    ('{"params": {"lr": {"type": "log", "low": "a", "high": 0.1}}}', "'a' is not a number"),
    ('{"params": {"lr": 0.1}}', 'expected a string like "log:1e-3:1e-1"'),
    ('{"params": {"optimizer": {"type": "choice", "values": "sgd"}}}', "choice needs 1 to 64 values"),
    ('{"params": {"lr": "log:1e-3:NaN"}}', "finite number"),
    ('{"params": ' * 100 + '1' + '}' * 100, "nested"),
    ('{"params": {"lr": "log:1e-3:1e-1"}', "not valid JSON"),
    (b'\xff\xfe', "UTF-8"),
])
def test_a_hostile_space_file_is_a_one_line_error(tmp_path, content, words):
    path = tmp_path / "space.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SweepError) as info:
        load_space(path)
    assert words in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_space_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "space.json"
    os.mkfifo(fifo)
    with pytest.raises(SweepError, match="not a regular file"):
        load_space(fifo)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"description": "lr and smoothing", "params": {
        "lr": "log:1e-2:0.5", "label_smoothing": {"type": "float", "low": 0, "high": 0.3}}}))
    assert [p.describe() for p in load_space(good).values()] == ["log:0.01:0.5", "float:0:0.3"]


def test_the_cli_refuses_a_sweep_without_a_validation_split_and_writes_nothing(tmp_path, capsys):
    code = cli_main(["sweep", str(tmp_path / "s"), "--preset", "fast", "--param", "lr=log:0.01:0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: a sweep needs --val-split N") and err.count("\n") == 1
    assert "never on the test set" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("storage, words", [
    ("sqlite:///{tmp}/notes.txt", "not an SQLite database"),
    ("sqlite:///{tmp}/fifo.db", "not a regular file"),
    ("sqlite:///{tmp}/missing/dir/study.db", "does not exist"),
    ("nosuchdb://user:secret@host/db", "cannot open it"),
])
def test_an_unusable_storage_is_a_one_line_error(data_dir, tmp_path, capsys, storage, words):
    (tmp_path / "notes.txt").write_text("a file of the user's " * 10)
    os.mkfifo(tmp_path / "fifo.db")
    code = cli_main(["sweep", str(tmp_path / "s"), *TINY, "--data-dir", str(data_dir), "--param", "lr=log:0.01:0.5",
                     "--storage", storage.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert "secret" not in err  # a database password never goes into a message
    assert (tmp_path / "notes.txt").read_text() == "a file of the user's " * 10


# ---------------------------------------------------------------------------------------------------
# Pruning: the callback in the training loop


class _PruneAfterFirstEpoch:
    """Optuna's trial interface, as the pruning callback sees it."""

    def __init__(self):
        self.reported = []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return True


def test_a_pruned_run_stops_after_the_epoch_and_its_folder_says_so(cifar, tmp_path):
    from cifarlab.train import train

    small = CIFAR10(train=cifar.train.subset(slice(0, 300)), test=cifar.test.subset(slice(0, 10)),
                    classes=cifar.classes, root=cifar.root)
    trial = _PruneAfterFirstEpoch()
    run = tmp_path / "run"
    result = train(recipe_from("fast", epochs=3, batch_size=100, val_split=100), small, run, trial=trial,
                   progress=False, log=lambda *a, **k: None)
    assert [step for step, _ in trial.reported] == [1] and len(result.history) == 1
    assert trial.reported[0][1] == result.history[0]["val_acc"]
    pruned = json.loads((run / "pruned.json").read_text())
    assert pruned == {"pruned_at_epoch": 1, "epochs": 3, "val_acc": result.history[0]["val_acc"]}
    assert not (run / "final").exists() and ckpts.checkpoint_dirs(run)  # stopped at a resumable checkpoint


# ---------------------------------------------------------------------------------------------------
# The sweep itself: real processes


def test_a_sweep_killed_mid_way_resumes_without_repeating_finished_trials(data_dir, tmp_path, capsys):
    folder = tmp_path / "sweep"
    command = [sys.executable, "-m", "cifarlab", "sweep", str(folder), *TINY, "--param", "lr=log:0.01:0.5",
               "--param", "label_smoothing=float:0:0.3", "--trials", "3", "--pruner", "none"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=_env(data_dir), start_new_session=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("trial 0: "):
            break
    deadline = time.monotonic() + 120
    while not (folder / "trial-0001" / "recipe.json").exists():  # trial 1 is training
        assert time.monotonic() < deadline and first.poll() is None, "".join(seen)
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    first.stdout.close()
    assert not (folder / "trial-0001" / "final").exists(), "trial 1 finished before the kill; the test needs it running"
    final0 = {p.name: p.stat().st_mtime_ns for p in (folder / "trial-0000" / "final").iterdir()}
    accuracy0 = float(seen[-1].split("val acc ")[1].split()[0])

    again = subprocess.run(command, capture_output=True, text=True, env=_env(data_dir), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout
    assert "continuing the study 'sweep': 1 of 3 trials finished" in out
    assert "trial 1: its process ended mid-trial (killed); marked failed, parameters queued again" in out
    assert "trial 0: " not in out and "Traceback" not in again.stderr  # trial 0 was not run again
    rows = _rows(folder)
    assert rows[0]["state"] == "complete" and abs(float(rows[0]["val_acc"]) - accuracy0) < 1e-4
    assert rows[1]["state"] == "killed, rerun as 2" and rows[1]["seconds"] == ""
    assert (rows[2]["lr"], rows[2]["label_smoothing"]) == (rows[1]["lr"], rows[1]["label_smoothing"])
    assert sorted(n for n, r in rows.items() if r["state"] == "complete") == [0, 2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "trial-0000" / "final").iterdir()} == final0
    assert json.loads((folder / "trial-0001" / "trial.json").read_text())["note"].startswith("killed")
    for n in (0, 2, 3):  # each trial is a normal run folder with its record
        assert ckpts.load_checkpoint(folder / f"trial-{n:04d}").meta["val_size"] == 200
        assert json.loads((folder / f"trial-{n:04d}" / "trial.json").read_text())["state"] == "complete"
    assert (folder / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max((r for r in rows.values() if r["state"] == "complete"), key=lambda r: float(r["val_acc"]))
    assert f"best: trial {best['trial']}, validation accuracy {float(best['val_acc']):.4f}" in out

    # The same study with another space is refused, naming the difference; nothing is trained.
    code = cli_main(["sweep", str(folder), *TINY, "--data-dir", str(data_dir), "--param", "lr=log:0.001:0.5",
                     "--param", "label_smoothing=float:0:0.3", "--trials", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "was started with another space" in err and "log:0.001:0.5" in err
    assert sorted(p.name for p in folder.glob("trial-*")) == [f"trial-{n:04d}" for n in range(4)]


def test_two_worker_processes_share_one_study(data_dir, tmp_path):
    folder = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "cifarlab", "sweep", str(folder), *TINY, "--param",
                           "lr=log:0.01:0.5", "--trials", "2", "--epochs", "2", "--workers", "2", "--pruner", "median"],
                          capture_output=True, text=True, env=_env(data_dir), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 2 and all(t.state != optuna.trial.TrialState.FAIL for t in finished)
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2, workers  # two processes, each ran trials from the one storage
    assert {"[worker 0]", "[worker 1]"} <= {line[:10] for line in done.stdout.splitlines()}
    assert len(_rows(folder)) == len(study.trials)
