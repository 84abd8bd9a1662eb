"""Issue 14, cases 5, 7 and 9: every file read back from disk is checked before use.

Files that are not files (a FIFO, a symlink to /dev/urandom, a 20 GB sparse file) are refused before
any read; a checkpoint's meta.json and training-state header pass a checksum and a schema (types,
bounds, finite numbers, nesting depth); weights with NaN are refused even when their checksum matches;
``eval/results.json`` has a schema too. Each damaged file is written twice where it matters: as an
editor would leave it (the checksum no longer matches) and consistently re-signed (as a hostile
writer who knows the format would), so the checks behind the checksum are exercised as well.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cifarlab import checkpoints as ckpts
from cifarlab import validation as V
from cifarlab.cli import main as cli_main
from cifarlab.errors import CheckpointError
from cifarlab.models import Net
from cifarlab.transforms import Normalization

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = {"name": "tiny", "layers": [{"type": "conv", "filters": 2, "kernel": 3}, {"type": "relu"},
                                   {"type": "global_avgpool"}, {"type": "dense", "units": 10}]}


def _meta(model: Net) -> dict:
    return {"architecture": model.declaration, "classes": CLASSES,
            "normalization": Normalization.named("exercise").to_dict(),
            "recipe": {"tta": 0, "seed": 0}, "epoch": 1, "history": [], "metrics": {}}


def _state(epoch=1, step=0, global_step=10) -> dict:
    return {"epoch": epoch, "step_in_epoch": step, "global_step": global_step,
            "optimizer": {"param_groups": [{"params": [0, 1, 2, 3], "lr": 0.1}], "plain": {}},
            "recipe": {"epochs": 2}, "world_size": 1, "partial_epoch": {}}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A small, complete, resumable checkpoint folder."""
    torch.manual_seed(0)
    model = Net(TINY)
    opt = {f"{i}.momentum_buffer": torch.zeros_like(p) for i, p in enumerate(model.parameters())}
    opt["rng.torch.rank0"] = torch.get_rng_state()
    return ckpts.save_checkpoint(tmp_path / "ckpt", model, _meta(model), train_state=_state(),
                                 optimizer_tensors=opt)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(path)
    return path


def resign(folder: Path, meta) -> None:
    """meta.json (and its copy in model.safetensors' header) written the way save_checkpoint would:
    with a matching metadata checksum. ``meta`` may be any JSON value, or text."""
    text = meta if isinstance(meta, str) else None
    if isinstance(meta, dict):
        meta = dict(meta)
        meta[V.META_SHA_KEY] = V.meta_sha256(meta)
    if text is None:
        text = json.dumps(meta)
    weights = folder / ckpts.MODEL_FILE
    save_file(load_file(weights), weights, metadata={"cifarlab": text})
    (folder / ckpts.META_FILE).write_text(text)


def rewrite_state(folder: Path, edit, drop=()) -> None:
    """The training state rewritten consistently: header checksum and optimizer checksum recomputed."""
    path = folder / ckpts.STATE_FILE
    with safe_open(path, "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    state = edit(json.loads(header["cifarlab_train_state"]))
    save_file(tensors, path, metadata={"cifarlab_train_state": json.dumps(state),
                                       "optimizer_sha256": ckpts.weights_sha256(tensors),
                                       V.STATE_SHA_KEY: V.state_sha256(state) if isinstance(state, dict) else ""})


def _cli_error(args, capsys) -> str:
    code = cli_main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------------------
# Case 5: files that are not files


def test_a_fifo_model_file_is_refused_without_blocking(ckpt, image):
    weights = ckpt / ckpts.MODEL_FILE
    weights.unlink()
    os.mkfifo(weights)
    # A separate process with a timeout: before the fix `predict` blocked forever in open().
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cifarlab", "predict", str(ckpt), str(image)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {weights}: the file is not a regular file (it is a FIFO); refusing to read it.\n"
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("name", [ckpts.MODEL_FILE, ckpts.META_FILE, ckpts.STATE_FILE])
def test_a_symlink_to_dev_urandom_is_refused_before_reading(ckpt, name):
    (ckpt / name).unlink()
    (ckpt / name).symlink_to("/dev/urandom")
    with pytest.raises(CheckpointError, match=rf"{name}: the \w+ is not a regular file \(it is a character device\)"):
        ckpts.load_checkpoint(ckpt, with_train_state=True)


@pytest.mark.parametrize("name, limit", [(ckpts.MODEL_FILE, ckpts.MAX_WEIGHTS_BYTES),
                                         (ckpts.META_FILE, V.MAX_JSON_BYTES),
                                         (ckpts.STATE_FILE, ckpts.MAX_STATE_BYTES)])
def test_a_20_gb_sparse_file_is_refused_by_its_size(ckpt, name, limit):
    with open(ckpt / name, "r+b") as f:
        f.truncate(20 * 1024 ** 3)  # sparse: no disk space used, but a whole read needs 20 GB of memory
    with pytest.raises(CheckpointError, match=rf"{name}: the \w+ is 20\.0 GiB, more than the .* it may be"):
        ckpts.load_checkpoint(ckpt, with_train_state=True)
    assert limit < 20 * 1024 ** 3


def test_read_bounded_on_every_kind_of_non_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device"), (tmp_path, "a folder")):
        with pytest.raises(V.ValidationError, match=f"not a regular file \\(it is {kind}\\)"):
            V.read_bounded(path, 100, "file")
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(V.ValidationError, match="101 bytes, more than the 100 bytes"):
        V.read_bounded(tmp_path / "big", 100)
    with pytest.raises(V.ValidationError, match="missing"):
        V.read_bounded(tmp_path / "none", 100)
    assert V.read_bounded(tmp_path / "big", 101) == b"x" * 101


# ---------------------------------------------------------------------------------------------------
# Case 7: metadata


def _good(ckpt: Path) -> dict:
    meta = json.loads((ckpt / ckpts.META_FILE).read_text())
    meta.pop(V.META_SHA_KEY)
    return meta


HOSTILE_META = {
    # name: (edit of the good metadata, words in the error)
    "a list": (lambda m: [m], "the metadata is a list, not an object"),
    "a string": (lambda m: json.dumps("meta"), "the metadata is a string, not an object"),
    "200,000 deep": (lambda m: "[" * 200_000 + "]" * 200_000, "JSON nested too deeply"),
    "64 deep inside": (lambda m: dict(m, metrics=json.loads("{\"a\":" * 70 + "1" + "}" * 70)), "nested too deeply"),
    "std 0": (lambda m: dict(m, normalization={"mean": [0.5] * 3, "std": [1, 0, 1]}),
              "'normalization.std[1]' = 0 is outside (0.0, 1000000.0]"),
    "std 'nan'": (lambda m: dict(m, normalization={"mean": [0.5] * 3, "std": ["nan"] * 3}),
                  "'normalization.std[0]' must be a number, not a string 'nan'"),
    "std NaN literal": (lambda m: json.dumps(m).replace('"std": [1.0', '"std": [NaN'), "not valid JSON"),
    "std missing": (lambda m: dict(m, normalization={"mean": [0.5] * 3}), "'normalization.std' is missing"),
    "std two values": (lambda m: dict(m, normalization={"mean": [0.5] * 3, "std": [1, 1]}),
                       "'normalization.std' must have 1 or 3 values (one per channel), not 2"),
    "normalization missing": (lambda m: {k: v for k, v in m.items() if k != "normalization"},
                              "'normalization' is missing"),
    "classes missing": (lambda m: {k: v for k, v in m.items() if k != "classes"}, "'classes' is missing"),
    "classes a string": (lambda m: dict(m, classes="airplane"), "'classes' must be a list, not a string"),
    "classes numbers": (lambda m: dict(m, classes=list(range(10))), "'classes[0]' must be a string, not an integer"),
    "classes all 'a'": (lambda m: dict(m, classes=["a"] * 10), "'classes' names 'a' more than once"),
    "classes empty": (lambda m: dict(m, classes=[]), "'classes' must name at least one class"),
    "recipe a list": (lambda m: dict(m, recipe=[1, 2]), "'recipe' must be an object, not a list"),
    "epoch -1": (lambda m: dict(m, epoch=-1), "'epoch' = -1 is outside 0..10000"),
    "history of strings": (lambda m: dict(m, history=["x"]), "'history[0]' must be an object, not a string"),
    "architecture a list": (lambda m: dict(m, architecture=[]), "'architecture' must be an object, not a list"),
}


@pytest.mark.parametrize("name", HOSTILE_META)
def test_hostile_metadata_is_a_one_line_error_naming_the_field(ckpt, image, name, capsys):
    edit, words = HOSTILE_META[name]
    edited = edit(_good(ckpt))
    # As an editor leaves it: meta.json changed, its checksum (and the weights file's copy) not.
    (ckpt / ckpts.META_FILE).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(CheckpointError, match=str(ckpt / ckpts.META_FILE)):
        ckpts.load_checkpoint(ckpt)
    # Re-signed consistently: the schema names the field.
    resign(ckpt, edited)
    with pytest.raises(CheckpointError) as info:
        ckpts.load_checkpoint(ckpt)
    assert words in str(info.value) and str(ckpt) in str(info.value)
    err = _cli_error(["predict", str(ckpt), str(image)], capsys)
    assert words in err


def test_one_std_value_is_spread_over_the_channels(ckpt):
    resign(ckpt, dict(_good(ckpt), normalization={"mean": [0.5], "std": [0.25]}))
    assert ckpts.load_checkpoint(ckpt).meta["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}


def test_non_utf8_meta_json_names_the_file(ckpt, capsys):
    (ckpt / ckpts.META_FILE).write_bytes(b'{"format": "\xff"}')
    with pytest.raises(CheckpointError, match=rf"{ckpt / ckpts.META_FILE}: not UTF-8 text \(byte 12"):
        ckpts.load_checkpoint(ckpt)
    assert str(ckpt / ckpts.META_FILE) in _cli_error(["summary", "--checkpoint", str(ckpt)], capsys)


def test_nan_weights_with_a_matching_checksum_are_refused(ckpt, image, capsys):
    weights = ckpt / ckpts.MODEL_FILE
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    meta = dict(_good(ckpt), weights_sha256=ckpts.weights_sha256(tensors))
    save_file(tensors, weights)
    resign(ckpt, meta)
    with pytest.raises(CheckpointError, match=rf"weights hold NaN or infinite values \({key}\); refusing"):
        ckpts.load_checkpoint(ckpt)
    # Before: `predict` printed 'nan%' and exited 0.
    assert "NaN or infinite" in _cli_error(["predict", str(ckpt), str(image)], capsys)


# ---------------------------------------------------------------------------------------------------
# Case 7: the training state


HOSTILE_STATE = {
    "epoch 'x'": (lambda s: dict(s, epoch="x"), (), "'epoch' must be an integer, not a string 'x'"),
    "epoch -3": (lambda s: dict(s, epoch=-3), (), "'epoch' = -3 is outside 0..10000"),
    "partial_epoch a string": (lambda s: dict(s, partial_epoch="abc"), (),
                               "'partial_epoch' must be an object, not a string"),
    "partial_epoch of strings": (lambda s: dict(s, partial_epoch={"seen": "many"}), (),
                                 "'partial_epoch.seen' must be an integer"),
    "partial_epoch NaN": (lambda s: dict(s, partial_epoch={"loss_sum": -1.0}), (), "'partial_epoch.loss_sum' = -1.0"),
    "step missing": (lambda s: {k: v for k, v in s.items() if k != "step_in_epoch"}, (), "'step_in_epoch' is missing"),
    "optimizer a list": (lambda s: dict(s, optimizer=[]), (), "'optimizer' must be an object, not a list"),
    "a list": (lambda s: [s], (), "the training state must be a JSON object, not a list"),
    "RNG removed": (lambda s: s, ("rng.torch.rank0",), "the random-number generator state (tensor 'rng.torch.rank0') "
                                                      "is missing"),
}


@pytest.mark.parametrize("name", HOSTILE_STATE)
def test_hostile_training_state_is_refused(ckpt, name):
    edit, drop, words = HOSTILE_STATE[name]
    rewrite_state(ckpt, edit, drop)
    with pytest.raises(CheckpointError) as info:
        ckpts.load_checkpoint(ckpt, with_train_state=True)
    assert words in str(info.value) and str(ckpt / ckpts.STATE_FILE) in str(info.value)
    ckpts.load_checkpoint(ckpt)  # the weights alone are still usable for evaluation


def test_an_edited_training_state_header_is_detected_by_its_checksum(ckpt):
    path = ckpt / ckpts.STATE_FILE
    with safe_open(path, "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header["cifarlab_train_state"] = json.dumps(dict(json.loads(header["cifarlab_train_state"]), epoch=0))
    save_file(tensors, path, metadata=header)
    with pytest.raises(CheckpointError, match="training state checksum mismatch; the header was changed"):
        ckpts.load_checkpoint(ckpt, with_train_state=True)


def test_a_wrong_rng_tensor_is_refused(ckpt):
    rewrite_state(ckpt, lambda s: s, ())
    path = ckpt / ckpts.STATE_FILE
    with safe_open(path, "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["rng.torch.rank0"] = torch.zeros(7, dtype=torch.float32)
    header["optimizer_sha256"] = ckpts.weights_sha256(tensors)
    save_file(tensors, path, metadata=header)
    with pytest.raises(CheckpointError, match=r"'rng.torch.rank0' must be a uint8 vector of \d+ values"):
        ckpts.load_checkpoint(ckpt, with_train_state=True)


def test_position_outside_the_run_is_refused():
    state = _state(epoch=1, step=3, global_step=13)
    V.check_position(state, epochs=2, steps_per_epoch=10, source="x")
    for bad in (_state(3, 0, 30), _state(1, 10, 20), _state(1, 3, 99), _state(2, 1, 21)):
        with pytest.raises(V.ValidationError, match="does not fit a run of 2 epochs x 10 steps"):
            V.check_position(bad, epochs=2, steps_per_epoch=10, source="x")


# ---------------------------------------------------------------------------------------------------
# Properties: arbitrary JSON as meta.json is a CheckpointError or a checkpoint, never a traceback


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
FIELDS = ["architecture", "classes", "normalization", "recipe", "epoch", "history", "metrics", "format",
          "weights_sha256", "seed", "world_size", "versions", "val_source", "train_seconds", "data_identity"]
PROPERTY = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _load_or_checkpoint_error(folder: Path):
    try:
        return ckpts.load_checkpoint(folder)
    except CheckpointError as e:
        assert str(folder) in str(e)
        return None


@PROPERTY
@given(value=JSON, signed=st.booleans())
def test_arbitrary_json_as_meta_json_never_gives_a_traceback(ckpt, value, signed):
    if signed:
        resign(ckpt, value)
    else:
        (ckpt / ckpts.META_FILE).write_text(json.dumps(value))
    assert _load_or_checkpoint_error(ckpt) is None  # no JSON value but a whole valid metadata loads


@PROPERTY
@given(field=st.sampled_from(FIELDS), value=JSON, drop=st.booleans())
def test_any_field_of_a_valid_meta_replaced_by_arbitrary_json(ckpt, field, value, drop):
    meta = _good(ckpt)
    if drop:
        meta.pop(field, None)
    else:
        meta[field] = value
    resign(ckpt, meta)
    loaded = _load_or_checkpoint_error(ckpt)
    if loaded is not None:  # what loads is usable: classes, normalization, architecture as the rest expects
        assert len(loaded.meta["classes"]) == 10 and Normalization.from_dict(loaded.meta["normalization"])
        assert isinstance(loaded.meta.get("recipe", {}), dict)


@PROPERTY
@given(field=st.sampled_from(["epoch", "step_in_epoch", "global_step", "partial_epoch", "optimizer", "recipe",
                              "world_size"]), value=JSON)
def test_any_field_of_the_training_state_replaced_by_arbitrary_json(ckpt, field, value):
    rewrite_state(ckpt, lambda s: dict(s, **{field: value}))
    try:
        ckpts.load_checkpoint(ckpt, with_train_state=True)
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------------------------------
# Case 9: eval/results.json


def _results() -> dict:
    return {"num_images": 4, "accuracy": 0.5, "loss": 1.2, "classes": ["a", "b"],
            "per_class_accuracy": {"a": 0.5, "b": 0.5}, "confusion_matrix": [[1, 1], [1, 1]],
            "checkpoint": "runs/x/final", "architecture": "tiny", "tta": 0, "epoch": 1,
            "gallery_indices": [0, 3], "worst_mistakes": [{"index": 1, "true": "a", "predicted": "b", "score": 0.9}]}


@pytest.mark.parametrize("edit, words", [
    (lambda r: [], "evaluation results must be a JSON object, not a list"),
    (lambda r: dict(r, accuracy="high"), "'accuracy' must be a number"),
    (lambda r: dict(r, accuracy=1.5), "'accuracy' = 1.5 is outside [0.0, 1.0]"),
    (lambda r: {k: v for k, v in r.items() if k != "per_class_accuracy"}, "'per_class_accuracy' is missing"),
    (lambda r: dict(r, per_class_accuracy={"a": 0.5}), "'per_class_accuracy' must have one entry per class"),
    (lambda r: dict(r, worst_mistakes=[{"index": 1}]), "'worst_mistakes[0].true' is missing"),
    (lambda r: dict(r, gallery_indices=[99]), "'gallery_indices[0]' = 99 is outside 0..3"),
    (lambda r: dict(r, confusion_matrix=[[1, 1]]), "'confusion_matrix' must have 2 rows"),
    (lambda r: dict(r, checkpoint=None), "'checkpoint' must be a string"),
])
def test_results_json_schema(edit, words):
    V.check_results(_results(), "r.json")
    with pytest.raises(V.ValidationError) as info:
        V.check_results(edit(_results()), "r.json")
    assert words in str(info.value)


@PROPERTY
@given(value=JSON)
def test_arbitrary_json_as_results_is_a_validation_error_or_valid(value):
    try:
        V.check_results(value, "r.json")
    except V.ValidationError:
        pass


def test_json_depth_and_constants():
    with pytest.raises(V.ValidationError, match="nested too deeply"):
        V.parse_json("[" * 200_000 + "]" * 200_000, "f")
    with pytest.raises(V.ValidationError, match="not valid JSON"):
        V.parse_json('{"a": Infinity}', "f")
    assert V.parse_json(b'{"a": [1, {"b": 2}]}', "f") == {"a": [1, {"b": 2}]}
    assert V.json_depth({"a": [1, {"b": 2}]}) == 3
