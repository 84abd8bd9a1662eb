"""Save, load and resume: identical predictions; damaged or mismatched checkpoints give clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from cifarlab import checkpoints as C
from cifarlab.errors import CheckpointError
from cifarlab.evaluate import predict_logits
from cifarlab.models import build_model
from cifarlab.pipeline import check_compatible
from cifarlab.transforms import Normalization


def _meta(model, classes=None):
    return {"architecture": model.declaration, "classes": classes or [f"c{i}" for i in range(10)],
            "normalization": Normalization.named("exercise").to_dict(), "epoch": 3}


def test_save_load_gives_identical_predictions(tmp_path, cifar):
    torch.manual_seed(0)
    model = build_model("exercise").eval()
    folder = C.save_checkpoint(tmp_path / "ckpt", model, _meta(model, cifar.classes))
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]
    loaded = C.load_checkpoint(folder)
    norm = Normalization.named("exercise")
    images = cifar.test.images[:500]
    assert torch.equal(predict_logits(model, images, norm), predict_logits(loaded.model, images, norm))
    assert loaded.meta["epoch"] == 3 and loaded.meta["versions"]["torch"] == torch.__version__
    # The .safetensors file alone is a complete checkpoint (metadata embedded in its header).
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((folder / C.MODEL_FILE).read_bytes())
    assert torch.equal(predict_logits(C.load_checkpoint(alone).model, images, norm), predict_logits(model, images, norm))


def test_metadata_is_plain_json(tmp_path):
    model = build_model("exercise")
    folder = C.save_checkpoint(tmp_path / "ckpt", model, _meta(model))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == C.FORMAT and meta["architecture"]["name"] == "exercise"
    assert len(meta["weights_sha256"]) == 64


def test_overwriting_a_checkpoint_is_atomic(tmp_path):
    model = build_model("exercise")
    C.save_checkpoint(tmp_path / "ckpt", model, _meta(model))
    with torch.no_grad():
        model.conv1.bias.fill_(1.0)
    C.save_checkpoint(tmp_path / "ckpt", model, _meta(model))
    assert torch.all(C.load_checkpoint(tmp_path / "ckpt").model.conv1.bias == 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old copies left


def test_damaged_weights_are_detected(tmp_path):
    model = build_model("exercise")
    folder = C.save_checkpoint(tmp_path / "ckpt", model, _meta(model))
    weights = folder / C.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # a single flipped bit in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights checksum .* the checkpoint is damaged"):
        C.load_checkpoint(folder)
    weights.write_bytes(bytes(data[:1000]))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        C.load_checkpoint(folder)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = build_model("exercise")
    meta = _meta(model)
    meta["architecture"] = build_model("fast").declaration
    C.save_checkpoint(tmp_path / "ckpt", model, meta)
    with pytest.raises(CheckpointError, match="do not fit the stored architecture 'fast'"):
        C.load_checkpoint(tmp_path / "ckpt")


def test_checkpoint_for_other_classes_or_architecture_is_refused(tmp_path, cifar):
    model = build_model("exercise")
    C.save_checkpoint(tmp_path / "ckpt", model, _meta(model, classes=[f"c{i}" for i in range(10)]))
    ckpt = C.load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="trained for classes"):
        check_compatible(ckpt, cifar)
    C.save_checkpoint(tmp_path / "ok", model, _meta(model, classes=cifar.classes))
    with pytest.raises(CheckpointError, match="holds architecture 'exercise', not the 'fast' asked for"):
        check_compatible(C.load_checkpoint(tmp_path / "ok"), cifar, "fast")


def test_pickle_checkpoints_are_refused_by_default(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("exercise").state_dict(), path)
    with pytest.raises(CheckpointError, match="refuses them"):
        C.load_checkpoint(path)
    tensors = C.load_pickle_weights(path, allow_pickle=True)
    assert set(tensors) == set(build_model("exercise").state_dict())


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        C.load_checkpoint(tmp_path / "nothing")
