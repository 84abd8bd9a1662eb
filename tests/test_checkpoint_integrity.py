"""Damaged checkpoints are named and skipped; a NaN loss stops the run and keeps the last good checkpoint.

A small real run (500 CIFAR-10 images, batch 50, checkpoints every 4 steps) gives two checkpoints
(steps 8 and 10) and final/. Each test damages a copy the way disks and crashes do (flipped bytes,
truncation, lost blocks, a missing file) and checks the exact error and the fallback.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import checkpoints as ckpts
from cifarlab.cli import main as cli_main
from cifarlab.data import CIFAR10, Split
from cifarlab.data.cifar10 import read_bin, read_class_names
from cifarlab.errors import CheckpointError, TrainingError
from cifarlab.train import epoch_order, recipe_from, train

BATCH, EVERY = 50, 4
QUIET = {"progress": False, "log": lambda *a, **k: None}

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def tiny(data_dir) -> CIFAR10:
    x, y = read_bin(data_dir / "data_batch_2.bin")
    return CIFAR10(train=Split(torch.from_numpy(x[:500]), torch.from_numpy(y[:500].astype(np.int64))),
                   test=Split(torch.from_numpy(x[-100:]), torch.from_numpy(y[-100:].astype(np.int64))),
                   classes=read_class_names(data_dir / "batches.meta.txt"))


RECIPE = dict(epochs=1, batch_size=BATCH)


@pytest.fixture(scope="module")
def good_run(tiny, tmp_path_factory):
    """(run folder, final weights) of an uninterrupted run: checkpoints step 8 and 10, and final/."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("good") / "run"
    result = train(recipe_from("exercise", **RECIPE), tiny, run, checkpoint_every=EVERY, **QUIET)
    assert [p.name for p in ckpts.checkpoint_dirs(run)] == ["step-000000010", "step-000000008"]
    return run, {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.fixture
def run(good_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(good_run[0], copy)
    return copy


def _header_len(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    # name: (how, words the error must contain)
    "weight byte flipped": (lambda p: _flip(p, 8 + _header_len(p) + 1000), "does not match the metadata"),
    "last weight byte flipped": (lambda p: _flip(p, p.stat().st_size - 1), "does not match the metadata"),
    "header byte flipped": (lambda p: _flip(p, 8), "not a valid safetensors file"),
    "header length garbage": (lambda p: p.write_bytes((1 << 62).to_bytes(8, "little") + p.read_bytes()[8:]),
                              "not a valid safetensors file"),
    "truncated to half": (lambda p: _truncate(p, p.stat().st_size // 2), "not a valid safetensors file"),
    "truncated to 5 bytes": (lambda p: _truncate(p, 5), "not a valid safetensors file"),
    "empty": (lambda p: _truncate(p, 0), "not a valid safetensors file"),
    "last 4 KiB zeroed": (lambda p: p.write_bytes(p.read_bytes()[:-4096] + bytes(4096)), "does not match"),
    "deleted": (lambda p: p.unlink(), "model.safetensors is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_weights_are_named_and_resume_falls_back_to_the_previous_checkpoint(run, good_run, tiny, damage):
    how, words = DAMAGE[damage]
    newest, previous = ckpts.checkpoint_dirs(run)
    weights = newest / ckpts.MODEL_FILE
    how(weights)
    with pytest.raises(CheckpointError) as info:
        ckpts.load_checkpoint(newest)
    message = str(info.value)
    assert words in message
    assert str(weights if damage != "deleted" else newest) in message  # names the damaged file
    warnings = []
    ckpt = ckpts.load_latest(run, with_train_state=True, report=warnings.append)
    assert ckpt.path == previous and ckpt.train_state["global_step"] == 8
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and str(newest) in warnings[0]
    # Resuming redoes the two lost steps and ends with exactly the weights of the undamaged run.
    log = []
    resumed = train(recipe_from("exercise", **RECIPE), tiny, run, resume=True, checkpoint_every=EVERY,
                    progress=False, log=log.append)
    assert any(f"resuming from {previous} (epoch 1, step 8)" in line for line in log)
    for k, v in good_run[1].items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_damaged_optimizer_state_is_detected_and_skipped(run):
    newest, previous = ckpts.checkpoint_dirs(run)
    state = newest / ckpts.STATE_FILE
    _flip(state, state.stat().st_size - 3)
    with pytest.raises(CheckpointError, match="optimizer state checksum mismatch; the file is damaged"):
        ckpts.load_checkpoint(newest, with_train_state=True)
    ckpts.load_checkpoint(newest)  # the weights alone are still fine for evaluation
    assert ckpts.load_latest(run, with_train_state=True, report=None).path == previous


@pytest.mark.parametrize("edit, words", [
    (lambda meta: "{ not json", "metadata is not valid JSON"),
    (lambda meta: json.dumps(dict(meta, weights_sha256="0" * 64)), "does not match the metadata's 000000000000"),
    (lambda meta: json.dumps(dict(meta, format="something-else")), "not a cifarlab checkpoint"),
    (lambda meta: json.dumps(dict(meta, architecture={"layers": [{"type": "conv", "filters": 10 ** 12}]})),
     "stored architecture is invalid: layer 0 'conv_1' (conv): 'filters' = 1000000000000 is outside 1..8192"),
], ids=["not-json", "wrong-checksum", "wrong-format", "hostile-architecture"])
def test_damaged_or_hostile_metadata_is_a_clear_error(run, edit, words):
    # Written consistently (metadata checksum recomputed, the copy in the weights file's header too), so
    # the checks behind the checksum are what refuses it.
    newest = ckpts.checkpoint_dirs(run)[0]
    meta_path = newest / ckpts.META_FILE
    resign(newest, edit(json.loads(meta_path.read_text())))
    with pytest.raises(CheckpointError) as info:
        ckpts.load_checkpoint(newest)
    assert words in str(info.value) and str(newest) in str(info.value)


def resign(folder: Path, text: str) -> None:
    """Write ``text`` as the folder's metadata the way save_checkpoint would: with its checksum, and the
    same copy in model.safetensors' header (weights unchanged)."""
    from safetensors.torch import load_file, save_file

    from cifarlab.validation import META_SHA_KEY, meta_sha256

    try:
        meta = json.loads(text)
        if isinstance(meta, dict):
            meta[META_SHA_KEY] = meta_sha256(meta)
            text = json.dumps(meta)
    except ValueError:
        pass
    weights = folder / ckpts.MODEL_FILE
    save_file(load_file(weights), weights, metadata={"cifarlab": text})
    (folder / ckpts.META_FILE).write_text(text)


def test_an_edited_meta_json_is_detected_by_its_checksum(run):
    newest = ckpts.checkpoint_dirs(run)[0]
    meta_path = newest / ckpts.META_FILE
    for edit in (lambda m: dict(m, classes=list("abcdefghij")), lambda m: dict(m, epoch=7),
                 lambda m: {k: v for k, v in dict(m, epoch=0).items() if k != "meta_sha256"}):
        original = meta_path.read_text()
        meta_path.write_text(json.dumps(edit(json.loads(original))))
        with pytest.raises(CheckpointError, match=r"meta\.json: metadata checksum .* does not match the stored .*"
                                                  r"changed after it was written"):
            ckpts.load_checkpoint(newest)
        meta_path.write_text(original)
    assert ckpts.load_checkpoint(newest).path == newest


def test_damaged_final_model_falls_back_to_the_newest_checkpoint(run):
    _flip(run / "final" / ckpts.MODEL_FILE, (run / "final" / ckpts.MODEL_FILE).stat().st_size - 10)
    warnings = []
    ckpt = ckpts.load_latest(run, report=warnings.append)
    assert ckpt.path == ckpts.checkpoint_dirs(run)[0]
    assert str(run / "final" / ckpts.MODEL_FILE) in warnings[0]


def test_when_every_checkpoint_is_damaged_resume_refuses_instead_of_starting_over(run, tiny):
    for folder in ckpts.checkpoint_dirs(run):
        _truncate(folder / ckpts.MODEL_FILE, 100)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint; all 2 are damaged\. First: .*step-000000010"):
        train(recipe_from("exercise", **RECIPE), tiny, run, resume=True, **QUIET)
    assert [p.name for p in ckpts.checkpoint_dirs(run)] == ["step-000000010", "step-000000008"]  # nothing deleted


def test_cli_evaluate_of_a_damaged_checkpoint_is_an_error_not_a_traceback(run, capsys):
    newest = ckpts.checkpoint_dirs(run)[0]
    _flip(newest / ckpts.MODEL_FILE, (newest / ckpts.MODEL_FILE).stat().st_size - 1)
    assert cli_main(["evaluate", str(newest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(newest / ckpts.MODEL_FILE) in err and "damaged" in err


# ---------------------------------------------------------------------------------------------------
# NaN / inf


def _nan_at_step(tiny: CIFAR10, global_step: int) -> CIFAR10:
    """The same images as float 0..255 with one NaN pixel in an image of the batch of ``global_step``."""
    order = epoch_order(0, 0, len(tiny.train))
    images = tiny.train.images.float().clone()
    images[order[(global_step - 1) * BATCH], 1, 5, 7] = float("nan")
    return CIFAR10(train=Split(images, tiny.train.labels), test=tiny.test, classes=tiny.classes)


def test_nan_in_the_data_stops_training_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(recipe_from("exercise", **RECIPE), _nan_at_step(tiny, 7), run, checkpoint_every=EVERY, **QUIET)
    assert str(info.value).startswith("the loss became NaN or infinite in epoch 1 (by step 8); stopping. The last "
                                      "good checkpoint is kept")
    assert [p.name for p in ckpts.checkpoint_dirs(run)] == ["step-000000004"]
    assert not list((run / "checkpoints").glob(".step-*"))
    ckpt = ckpts.load_latest(run, with_train_state=True)
    assert all(torch.isfinite(t).all() for t in ckpt.model.state_dict().values())
    # With the bad image gone the data is not the data the run started on: resume names the difference
    # (issue 14: a resume continues exactly the run it was started as); a new run with the good data trains.
    with pytest.raises(CheckpointError, match=r"step-000000004: data train_sha256 \w+\.\.\. \(saved\) vs \w+\.\.\. \(now\)"):
        train(recipe_from("exercise", **RECIPE), tiny, run, resume=True, checkpoint_every=EVERY, **QUIET)
    result = train(recipe_from("exercise", **RECIPE), tiny, run.with_name("fixed"), checkpoint_every=EVERY, **QUIET)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])


def test_absurd_learning_rate_diverges_to_a_clear_error_keeping_the_last_good_checkpoint(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"^lr must be in 1e-12..100, not "):
        recipe_from("exercise", lr=1e3)
    run = tmp_path / "run"
    recipe = recipe_from("exercise", optimizer="sgd", lr=100.0, **RECIPE)
    with pytest.raises(TrainingError, match=r"the loss became NaN or infinite in epoch 1 \(by step \d+\)"):
        train(recipe, tiny, run, checkpoint_every=2, **QUIET)
    folders = ckpts.checkpoint_dirs(run)
    assert folders and not (run / "final").exists()
    for folder in folders:
        ckpt = ckpts.load_checkpoint(folder, with_train_state=True)
        assert all(torch.isfinite(t).all() for t in ckpt.model.state_dict().values())


def test_the_nan_advice_can_be_followed(tiny, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train(recipe_from("exercise", optimizer="sgd", lr=100.0, **RECIPE), tiny, run, checkpoint_every=2, **QUIET)
    if "lower the learning rate and resume" in str(info.value):  # then resuming with a lower one must work
        train(recipe_from("exercise", optimizer="sgd", lr=0.01, **RECIPE), tiny, run, resume=True, **QUIET)
