"""``cifarlab export --format onnx``: onnxruntime on raw pixels must match PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cifarlab.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from cifarlab.cli import main  # noqa: E402
from cifarlab.evaluate import predict_logits  # noqa: E402
from cifarlab.export import compare_with_torch, default_output, export_onnx, run_onnx  # noqa: E402
from cifarlab.models import build_model  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "exercise.onnx"
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_onnx_matches_pytorch_on_1000_real_test_images(exported, trained_run, cifar):
    ckpt = load_checkpoint(trained_run)
    images = cifar.test.images[:1000]
    report = compare_with_torch(exported, ckpt, images)
    print(f"\nONNX vs PyTorch on {report['images']} test images: max |logit diff| {report['max_abs_logit_diff']:.3g}")
    assert report["same_predictions"]
    assert report["max_abs_logit_diff"] < TOLERANCE
    # And the probabilities output is the softmax of the logits.
    logits, probabilities = run_onnx(exported, images[:100].numpy().astype(np.float32))
    expected = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    assert np.abs(probabilities - expected).max() < 1e-6


def test_contract_input_output_and_metadata(exported, trained_run):
    model = onnx.load(str(exported))
    (inp,) = model.graph.input
    assert inp.name == "pixels"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # dynamic batch
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    meta = {p.key: p.value for p in model.metadata_props}
    ckpt = load_checkpoint(trained_run)
    assert json.loads(meta["cifarlab.classes"]) == ckpt.meta["classes"]
    assert json.loads(meta["cifarlab.normalization"]) == ckpt.meta["normalization"]
    assert meta["cifarlab.architecture"] == "exercise"


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported, trained_run, cifar, batch):
    ckpt = load_checkpoint(trained_run)
    images = cifar.test.images[:batch]
    logits, _ = run_onnx(exported, images.numpy().astype(np.float32))
    expected = predict_logits(ckpt.model, images, Normalization.from_dict(ckpt.meta["normalization"]))
    assert logits.shape == (batch, 10)
    assert np.abs(logits - expected.numpy()).max() < TOLERANCE


def test_every_layer_type_exports(tmp_path, cifar):
    """The airbench-style 'fast' net (whitening, batchnorm, GELU, global max-pool, logit scale) with the
    standard normalization, from random weights and real batchnorm statistics."""
    torch.manual_seed(0)
    model = build_model("fast")
    norm = Normalization.named("standard")
    model.init_from_data(norm(cifar.train.images[:500]))
    model.train()
    with torch.no_grad():
        model(norm(cifar.train.images[:256]))  # non-trivial running statistics
    model.eval()
    meta = {"architecture": model.declaration, "classes": list(cifar.classes), "normalization": norm.to_dict(),
            "recipe": {}, "epoch": 0, "history": []}
    save_checkpoint(tmp_path / "fast", model, meta)
    ckpt = load_checkpoint(tmp_path / "fast")
    report = export_onnx(ckpt, tmp_path / "fast.onnx")
    assert report["verified"]["max_abs_logit_diff"] < TOLERANCE
    check = compare_with_torch(tmp_path / "fast.onnx", ckpt, cifar.test.images[:200])
    assert check["same_predictions"] and check["max_abs_logit_diff"] < TOLERANCE


def test_default_output_never_inside_a_checkpoint_and_no_overwrite(trained_run, tmp_path, capsys):
    assert default_output(trained_run) == trained_run / "model.onnx"
    assert default_output(tmp_path / "w.safetensors") == tmp_path / "w.onnx"
    assert default_output(trained_run / "final") == trained_run / "model.onnx"
    assert default_output(trained_run / "final" / "model.safetensors") == trained_run / "model.onnx"
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old contents")
    # Issue 14 case 3: an existing file at --out is never replaced (the old behaviour replaced it).
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "m.onnx already exists; not replacing it" in capsys.readouterr().err
    assert out.read_bytes() == b"old contents"
    assert main(["export", str(trained_run), "--out", str(out), "--force"]) == 0  # asked for: replaced atomically
    assert "max |logit diff|" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left behind


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "tflite"])
