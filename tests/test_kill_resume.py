"""Training that survives: exact resume, SIGKILL at random moments (also in the middle of a checkpoint
write), Ctrl-C / SIGTERM to real processes, a full disk and an unwritable run folder.

Everything trains the exercise net on a small subset of the real CIFAR-10 (1,000 training images,
batch 50, 20 steps an epoch) so a whole run is a few seconds on one core. Processes are real
``python`` processes (a small driver calling ``cifarlab.train.train`` on the subset, or the ``cifarlab``
CLI on a python-version folder of real records); kills are real signals.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifarlab import checkpoints as ckpts
from cifarlab.data import CIFAR10, Split
from cifarlab.data.cifar10 import read_bin, read_class_names
from cifarlab.cli import main as cli_main
from cifarlab.errors import CheckpointError, CifarlabError
from cifarlab.train import recipe_from, train

N_TRAIN, N_TEST, BATCH, EPOCHS, EVERY = 1000, 300, 50, 3, 4
SPE = N_TRAIN // BATCH          # 20 steps an epoch
TOTAL = EPOCHS * SPE            # 60 steps
RECIPE = {"epochs": EPOCHS, "batch_size": BATCH}
QUIET = {"progress": False, "log": lambda *a, **k: None}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# Real data, small


@pytest.fixture(scope="module")
def small(data_dir) -> CIFAR10:
    x, y = read_bin(data_dir / "data_batch_1.bin")
    xt, yt = read_bin(data_dir / "test_batch.bin")
    return CIFAR10(train=Split(torch.from_numpy(x[:N_TRAIN]), torch.from_numpy(y[:N_TRAIN].astype(np.int64))),
                   test=Split(torch.from_numpy(xt[:N_TEST]), torch.from_numpy(yt[:N_TEST].astype(np.int64))),
                   classes=read_class_names(data_dir / "batches.meta.txt"), root=data_dir)


@pytest.fixture(scope="module")
def work(small, tmp_path_factory) -> Path:
    """A folder with the subset as .npz and the driver script."""
    root = tmp_path_factory.mktemp("survive")
    np.savez(root / "small.npz", xtr=small.train.images.numpy(), ytr=small.train.labels.numpy(),
             xte=small.test.images.numpy(), yte=small.test.labels.numpy(), classes=np.array(small.classes))
    (root / "driver.py").write_text(DRIVER)
    return root


DRIVER = r'''
import json, os, signal, sys
import numpy as np, torch

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
from cifarlab.data import CIFAR10, Split
from cifarlab.train import TrainingInterrupted, recipe_from, train

d = np.load(args["data"])
data = CIFAR10(train=Split(torch.from_numpy(d["xtr"]), torch.from_numpy(d["ytr"])),
               test=Split(torch.from_numpy(d["xte"]), torch.from_numpy(d["yte"])),
               classes=[str(c) for c in d["classes"]])
# One byte per finished optimizer step: how far training got when the process was killed.
fd = os.open(args["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *a: os.write(fd, b"."))
if args.get("fsize"):  # a "full disk": no file may grow past this many bytes (write fails with EFBIG)
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["fsize"], args["fsize"]))
print("READY", flush=True)
try:
    result = train(recipe_from("exercise", **args["recipe"]), data, args["run_dir"], device="cpu", resume=True,
                   checkpoint_every=args["every"], progress=False, max_steps=args.get("max_steps"),
                   log=lambda *a, **k: print(*a, flush=True))
except TrainingInterrupted as e:
    print(f"INTERRUPTED {e.checkpoint}", flush=True)
    sys.exit(130)
except Exception as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
if args.get("out"):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, args["out"])
print("DONE", flush=True)
'''


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


class Life:
    """One training process of the driver, its progress file and its output."""

    def __init__(self, work: Path, run: Path, name: str, **opts):
        self.progress = work / f"{name}.progress"
        self.log = work / f"{name}.log"
        self.progress.unlink(missing_ok=True)
        args = {"data": str(work / "small.npz"), "run_dir": str(run), "progress": str(self.progress),
                "recipe": RECIPE, "every": EVERY, **opts}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(work / "driver.py"), json.dumps(args)],
                                         stdout=out, stderr=subprocess.STDOUT, env=_env())

    @property
    def steps(self) -> int:
        return self.progress.stat().st_size if self.progress.exists() else 0

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)


def _tmp_dirs(run: Path) -> set[str]:
    root = run / ckpts.CKPT_DIR
    return {p.name for p in root.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")} \
        if root.is_dir() else set()


def _checkpoint_health(run: Path) -> tuple[int, list[str]]:
    """(global step of the newest checkpoint, names of listed checkpoints that do not load).

    The newest must load and verify, and resuming must meet no damaged checkpoint (no warnings)."""
    folders = ckpts.checkpoint_dirs(run)
    if not folders:
        return 0, []
    damaged = []
    for folder in folders:
        try:
            ckpts.load_checkpoint(folder, with_train_state=True)
        except CheckpointError:
            damaged.append(folder.name)
    warnings = []
    latest = ckpts.load_latest(run, with_train_state=True, report=warnings.append)
    assert not warnings and latest.path == folders[0], warnings
    return latest.train_state["global_step"], damaged


def _good_step(run: Path) -> int:
    """Global step of the newest checkpoint; every listed checkpoint must load and verify."""
    step, damaged = _checkpoint_health(run)
    assert not damaged, damaged
    return step


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run, started once in the background (same driver, same single thread)."""
    life = Life(work, work / "ref-run", "ref", out=str(work / "ref.safetensors"))
    yield life
    if life.proc.poll() is None:
        life.proc.kill()
        life.proc.wait()


def _reference_weights(reference) -> dict[str, torch.Tensor]:
    assert reference.wait() == 0, reference.text()
    return load_file(reference.log.parent / "ref.safetensors")


def _metrics(run: Path) -> list[dict]:
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    # Timing columns naturally differ; everything learned must not.
    return [{k: v for k, v in zip(header, r) if k not in ("seconds", "images_per_s")} for r in rows[1:]]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------------
# Exact resume (in this process)




@pytest.fixture(scope="module")
def tiny(small) -> CIFAR10:
    """500 images: 10 steps an epoch."""
    return CIFAR10(train=small.train.subset(slice(0, 500)), test=small.test.subset(slice(0, 100)),
                   classes=small.classes)


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    torch.set_num_threads(1)
    return train(recipe_from("exercise", epochs=2, batch_size=BATCH), tiny, tmp_path_factory.mktemp("whole"), **QUIET)


@pytest.mark.parametrize("stops", [[7], [10], [3, 9, 5], [1, 1]], ids=["mid-epoch", "epoch-end", "three-stops",
                                                                      "single-steps"])
def test_interrupted_then_resumed_run_gives_bitwise_identical_weights(tiny, whole, tmp_path, stops):
    recipe = recipe_from("exercise", epochs=2, batch_size=BATCH)
    run = tmp_path / "pieces"
    done = 0
    for n in stops:
        train(recipe, tiny, run, resume=True, max_steps=n, **QUIET)
        done += n
        assert ckpts.load_latest(run, with_train_state=True).train_state["global_step"] == done
    resumed = train(recipe, tiny, run, resume=True, **QUIET)
    _assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())  # bitwise, not approximately
    assert [dict(r, seconds=0, images_per_s=0) for r in whole.history] == \
        [dict(r, seconds=0, images_per_s=0) for r in resumed.history]


def test_resume_is_exact_with_augmentation_batchnorm_whitening_and_onecycle(tiny, tmp_path):
    # The 'fast' preset draws random flips and translations from the global RNG every step, has
    # BatchNorm running statistics, a data-initialised whitening layer and a per-step schedule.
    recipe = recipe_from("fast", epochs=2, batch_size=BATCH, tta=False)
    whole = train(recipe, tiny, tmp_path / "whole", **QUIET)
    run = tmp_path / "pieces"
    train(recipe, tiny, run, max_steps=13, checkpoint_every=5, **QUIET)
    resumed = train(recipe, tiny, run, resume=True, **QUIET)
    _assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())


def test_resuming_a_finished_run_changes_nothing_and_a_damaged_final_is_rewritten(tiny, tmp_path):
    """Before: resuming a finished run re-saved final/ and refitted the temperature (overwriting what
    `cifarlab calibrate` stored there). Now it trains nothing and leaves every file as it was."""
    recipe = recipe_from("exercise", epochs=1, batch_size=BATCH)
    run = tmp_path / "done"
    first = train(recipe, tiny, run, **QUIET)
    before = {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    said = []
    again = train(recipe, tiny, run, resume=True, progress=False, log=said.append)
    assert f"{run} already finished its 1 epochs; nothing to train, its final model is unchanged" in said
    after = {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before
    _assert_same_weights(first.model.state_dict(), again.model.state_dict())
    assert again.history == first.history and again.seconds == pytest.approx(first.seconds)
    weights = next((run / "final").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged final model is written again, not kept
    said.clear()
    train(recipe, tiny, run, resume=True, progress=False, log=said.append)
    assert any("cannot be read" in line and "writing it again" in line for line in said)
    _assert_same_weights(first.model.state_dict(), ckpts.load_checkpoint(run / "final").model.state_dict())


# ---------------------------------------------------------------------------------------------------
# SIGKILL at random moments


def _wait_until(life: Life, condition, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if life.proc.poll() is not None:
            pytest.fail(f"training ended (rc {life.proc.returncode}) before {what}:\n{life.text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{life.text()}")
        time.sleep(0.0005)


def test_sigkill_at_random_moments_loses_at_most_one_checkpoint_interval(work, reference, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(5)
    # 'checkpoint': SIGKILL as soon as a checkpoint's temporary folder appears (the write is under way);
    # 'steps': after a random number of steps plus a random delay; 'epoch-end': while the epoch's
    # validation, metrics.csv and end-of-epoch checkpoint are being written; 'startup': before training.
    plan = ["startup", "checkpoint", "steps", "epoch-end", "checkpoint", "steps", "checkpoint", "steps"]
    records = []
    for i, mode in enumerate(plan):
        start = _checkpoint_health(run)[0]
        stale = _tmp_dirs(run)
        life = Life(work, run, f"life{i}")
        if mode == "startup":
            time.sleep(rng.uniform(0.2, 1.0))
        elif mode == "checkpoint":
            _wait_until(life, lambda: _tmp_dirs(run) - stale, "a checkpoint write")
        elif mode == "steps":
            target = rng.randint(1, 2 * EVERY + 1)
            _wait_until(life, lambda: life.steps >= target, f"{target} steps")
            time.sleep(rng.uniform(0, 0.05))
        elif mode == "epoch-end":
            target = (start // SPE + 1) * SPE - start
            _wait_until(life, lambda: life.steps >= target, "the end of an epoch")
            time.sleep(rng.uniform(0, 0.03))
        life.proc.send_signal(signal.SIGKILL)
        assert life.wait() == -signal.SIGKILL, f"life {i} was not killed:\n{life.text()}"
        reached = start + life.steps
        mid_write = bool(_tmp_dirs(run) - stale)  # the killed write's temporary folder is still there
        # The newest checkpoint loads and verifies. An older one may be half deleted if the kill landed
        # while it was being pruned (a bug in checkpoints.prune_checkpoints, see the xfail test below);
        # resuming never reaches it, but it is recorded.
        good, damaged = _checkpoint_health(run)
        assert all(name < ckpts.checkpoint_name(good) for name in damaged), damaged
        lost = reached - good
        records.append({"life": i, "mode": mode, "resumed_from": start, "reached": reached, "checkpoint": good,
                        "lost": lost, "mid_write": mid_write, "half_pruned": damaged})
        # No warning about a damaged checkpoint (the plan's "only 60 optimizer steps" warning is expected).
        warnings = [line for line in life.text().splitlines() if "warning" in line and "optimizer steps" not in line]
        assert not warnings and "Traceback" not in life.text(), life.text()
        if start:
            assert f"step-{start:09d} (epoch" in life.text() or "resuming" not in life.text()
        assert 0 <= lost <= EVERY, records
        assert reached < TOTAL, "the plan let the run finish; it needs more steps"
    print(json.dumps(records, indent=1))
    assert sum(r["mid_write"] for r in records) >= 2, records  # kills really landed inside checkpoint writes
    assert sum(r["lost"] > 0 for r in records) >= 3, records    # and work was really lost (then redone)

    final = Life(work, run, "final", out=str(tmp_path / "final.safetensors"))
    assert final.wait() == 0, final.text()
    last = records[-1]["checkpoint"]
    assert f"resuming from {run / 'checkpoints' / ckpts.checkpoint_name(last)}" in final.text()
    assert not _tmp_dirs(run)  # leftovers of killed writes are swept
    _assert_same_weights(load_file(tmp_path / "final.safetensors"), _reference_weights(reference))
    assert _metrics(run) == _metrics(work / "ref-run")
    survived = len(records)
    print(f"{survived} SIGKILLs survived ({sum(r['mid_write'] for r in records)} inside a checkpoint write); "
          f"most steps lost: {max(r['lost'] for r in records)} (checkpoint every {EVERY})")


def test_sigkill_with_ema_mixup_and_cutmix_on_still_resumes_bitwise(work, tmp_path):
    # The stateful callbacks (EMA's averaged weights and update count) and the batch-replacing one
    # (MixUp/CutMix draws from the global RNG) must survive kills like the core state does.
    recipe = dict(RECIPE, ema=0.9, mixup=0.4, cutmix=1.0, label_smoothing=0.1)
    ref = Life(work, tmp_path / "ref", "ema-ref", recipe=recipe, out=str(tmp_path / "ref.safetensors"))
    assert ref.wait() == 0, ref.text()
    run = tmp_path / "run"
    for i, mode in enumerate(["steps", "checkpoint", "steps"]):
        start, stale = _good_step(run), _tmp_dirs(run)
        life = Life(work, run, f"ema{i}", recipe=recipe)
        if mode == "checkpoint":
            _wait_until(life, lambda: _tmp_dirs(run) - stale, "a checkpoint write")
        else:
            _wait_until(life, lambda: life.steps >= EVERY + 3, f"{EVERY + 3} steps")
        life.proc.send_signal(signal.SIGKILL)
        assert life.wait() == -signal.SIGKILL, life.text()
        assert start + life.steps < TOTAL
    final = Life(work, run, "ema-final", recipe=recipe, out=str(tmp_path / "final.safetensors"))
    assert final.wait() == 0, final.text()
    assert "resuming from" in final.text()
    _assert_same_weights(load_file(tmp_path / "final.safetensors"), load_file(tmp_path / "ref.safetensors"))
    assert _metrics(run) == _metrics(tmp_path / "ref")
    assert ckpts.load_checkpoint(run / "final").meta["recipe"]["ema"] == 0.9


def test_kill_while_pruning_an_old_checkpoint_leaves_no_damaged_checkpoint(work, small, tmp_path):
    # A kill aimed at a moment the random kills above hit only rarely: between two file deletions of an
    # old checkpoint being pruned. The driver is the same; it SIGKILLs itself right there.
    run = tmp_path / "run"
    train(recipe_from("exercise", **RECIPE), small, run, checkpoint_every=EVERY, max_steps=2 * EVERY + 1, **QUIET)
    assert [p.name for p in ckpts.checkpoint_dirs(run)] == ["step-000000009", "step-000000008"]
    hook = work / "kill_in_prune.py"
    hook.write_text(
        "import os, shutil, signal\nfrom pathlib import Path\n_rmtree = shutil.rmtree\n"
        "def rmtree(path, *a, **k):\n"
        "    p = Path(path)\n"
        "    if 'step-' in p.name and (p / 'model.safetensors').exists():\n"
        "        (p / 'model.safetensors').unlink()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _rmtree(path, *a, **k)\n"
        "shutil.rmtree = rmtree\n")
    driver = (work / "driver.py").read_text()
    (work / "driver_prune.py").write_text(f"exec(open({str(hook)!r}).read())\n" + driver)
    args = {"data": str(work / "small.npz"), "run_dir": str(run), "progress": str(tmp_path / "p"),
            "recipe": RECIPE, "every": EVERY}
    proc = subprocess.run([sys.executable, str(work / "driver_prune.py"), json.dumps(args)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    for folder in ckpts.checkpoint_dirs(run):
        ckpts.load_checkpoint(folder, with_train_state=True)  # today: 'model.safetensors: file is missing'


# ---------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_stops_cleanly(work, tmp_path, sig):
    run = tmp_path / "run"
    life = Life(work, run, "interrupted")
    _wait_until(life, lambda: life.steps >= 6, "6 steps")
    life.proc.send_signal(sig)
    assert life.wait() == 130, life.text()  # the library raised TrainingInterrupted
    steps = life.steps
    saved = _good_step(run)
    assert saved == steps, "the checkpoint is taken at the step where training stopped: nothing lost"
    assert f"INTERRUPTED {run / 'checkpoints' / ckpts.checkpoint_name(saved)}" in life.text()
    assert "Traceback" not in life.text()


def _python_version_folder(small: CIFAR10, root: Path) -> Path:
    """Real records as an image folder (PNG, lossless): a small dataset the CLI loads in a moment."""
    from conftest import write_image_folder

    return write_image_folder(small, root / "small-folder", test_images=100)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), **kw)


def _cli_train_args(folder: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", f"folder:{folder}", "--runs-dir", str(runs), "--name", "r", "--batch-size", "50",
            "--no-progress", "--threads", "1", *extra]


def test_cli_ctrl_c_saves_exits_130_and_says_how_to_resume(small, tmp_path, capsys):
    folder = _python_version_folder(small, tmp_path)
    runs = tmp_path / "runs"
    proc = _cli(_cli_train_args(folder, runs, "--epochs", "50"))
    for line in proc.stdout:  # the loop is running once the first epoch is announced
        if line.startswith("Epoch 1/50"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted; checkpoint saved at" in out
    # The hint names the runs folder (issue 14 case 11); --resume takes recipe, model and data from the run;
    # a fixed --threads is repeated (it keeps the resumed run bitwise equal to an uninterrupted one).
    assert f"Continue with: cifarlab train --name r --runs-dir {runs} --threads 1 --resume" in out
    assert "Traceback" not in err
    saved = _good_step(runs / "r")
    assert saved > 0
    assert cli_main(_cli_train_args(folder, runs, "--epochs", "50", "--resume", "--max-steps", "2")) == 0
    assert f"resuming from {runs / 'r' / 'checkpoints' / ckpts.checkpoint_name(saved)}" in capsys.readouterr().out
    assert _good_step(runs / "r") == saved + 2


# ---------------------------------------------------------------------------------------------------
# Full disk, unwritable run folder


FSIZE = 1 << 20  # model.safetensors alone is 4.3 MB


class _FileSizeLimit:
    """RLIMIT_FSIZE in this process: no file may grow past ``limit`` bytes; writes fail with EFBIG."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.previous[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.previous)
        signal.signal(signal.SIGXFSZ, self.handler)


def test_file_size_limit_is_an_error_and_keeps_the_previous_checkpoint(small, tmp_path):
    run = tmp_path / "run"
    recipe = recipe_from("exercise", **RECIPE)
    train(recipe, small, run, checkpoint_every=EVERY, max_steps=6, **QUIET)
    before = {p.name: (p / "model.safetensors").read_bytes() for p in ckpts.checkpoint_dirs(run)}
    assert _good_step(run) == 6
    with _FileSizeLimit(FSIZE), pytest.raises((OSError, CifarlabError)) as info:
        train(recipe, small, run, resume=True, checkpoint_every=EVERY, **QUIET)
    assert "File too large" in str(info.value)  # EFBIG, the way a quota or full disk refuses a write
    # The previous checkpoints are intact, bit for bit, and no half-written folder is left.
    assert {p.name: (p / "model.safetensors").read_bytes() for p in ckpts.checkpoint_dirs(run)} == before
    assert not _tmp_dirs(run) and _good_step(run) == 6
    train(recipe, small, run, resume=True, checkpoint_every=EVERY, max_steps=3, **QUIET)  # space again: carries on
    assert _good_step(run) == 9


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MB filesystem (tmpfs): one checkpoint (13 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the RLIMIT_FSIZE test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_an_error_and_keeps_the_previous_checkpoint(small, small_disk):
    run = small_disk / "run"
    recipe = recipe_from("exercise", **RECIPE)
    with pytest.raises((OSError, CifarlabError)) as info:
        train(recipe, small, run, checkpoint_every=EVERY, **QUIET)
    assert "No space left on device" in str(info.value)
    assert [p.name for p in ckpts.checkpoint_dirs(run)] == ["step-000000004"] and not _tmp_dirs(run)
    assert _good_step(run) == 4
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    train(recipe, small, run, resume=True, checkpoint_every=EVERY, max_steps=4, **QUIET)
    assert _good_step(run) == 8


def test_cli_full_disk_prints_a_clear_error_not_a_traceback(small, tmp_path, capsys):
    # cli.main in this process: `python -m cifarlab` is sys.exit(main()), so an exception escaping main()
    # is exactly a traceback on the terminal.
    folder = _python_version_folder(small, tmp_path)
    runs = tmp_path / "runs"
    args = _cli_train_args(folder, runs, "--epochs", "2", "--max-steps", "3", "--checkpoint-every", "1")
    assert cli_main(args) == 0 and _good_step(runs / "r") == 3
    capsys.readouterr()
    try:
        with _FileSizeLimit(FSIZE):
            code = cli_main(args + ["--resume"])
    finally:
        assert _good_step(runs / "r") == 3 and not _tmp_dirs(runs / "r")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "File too large" in err


def test_run_folder_that_is_a_file_is_an_error_and_writes_nothing(small, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises((OSError, CifarlabError)) as info:
        train(recipe_from("exercise", epochs=1, batch_size=BATCH), small, blocker, max_steps=2, **QUIET)
    assert str(blocker) in str(info.value)
    assert blocker.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [blocker]


def test_cli_unwritable_run_folder_prints_a_clear_error(small, tmp_path, capsys):
    folder = _python_version_folder(small, tmp_path)
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    code = cli_main(_cli_train_args(folder, blocker, "--epochs", "1", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(blocker) in err
