"""Declarations, building, initialization, the parameter count and the Keras-style summary."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cifarlab import models as M
from cifarlab.errors import DeclarationError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_exercise_net_has_the_exercise_parameter_count():
    model = M.build_model("exercise")
    assert model.num_parameters() == 1_084_234
    assert M.count_parameters(M.MODELS["exercise"]) == 1_084_234
    # Per layer, as in the exercise's Keras summary.
    per_layer = {name: sum(p.numel() for p in layer.parameters()) for name, layer in model.named_children()}
    assert {k: v for k, v in per_layer.items() if v} == {
        "conv1": 448, "conv2": 4640, "conv3": 9248, "conv4": 18496, "fc1": 1_048_832, "dense_1": 2570}


def test_exercise_net_layer_order_and_shapes():
    model = M.build_model("exercise")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "LeakyReLU", "MaxPool2d", "Dropout", "Conv2d", "LeakyReLU",
                     "Conv2d", "LeakyReLU", "MaxPool2d", "Dropout", "Flatten", "Linear", "LeakyReLU", "Dropout",
                     "Linear"]
    assert all(m.negative_slope == 0.1 for m in model if isinstance(m, torch.nn.LeakyReLU))
    assert [m.p for m in model if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25, 0.5]
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


def test_summary_table():
    text = M.summary(M.build_model("exercise"))
    assert "Total params: 1,084,234" in text and "Trainable params: 1,084,234" in text
    assert "conv1 (conv)" in text and "(None, 16, 32, 32)" in text and "(None, 4096)" in text
    assert "1,048,832" in text
    whiten = M.summary(M.get_declaration("fast"))
    assert "Non-trainable params: 312" in whiten  # the frozen whitening layer


def test_keras_initialization():
    torch.manual_seed(0)
    model = M.build_model("exercise")
    for layer in model:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            w = layer.weight
            receptive = w[0, 0].numel() if w.ndim == 4 else 1
            limit = math.sqrt(6 / (w.shape[1] * receptive + w.shape[0] * receptive))
            assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit  # Glorot-uniform bound, reached
            assert torch.count_nonzero(layer.bias) == 0


def test_user_declaration_file_json_and_toml(tmp_path):
    decl = json.loads((EXAMPLES / "small_cnn.json").read_text())
    model = M.build_model(decl)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    toml = tmp_path / "tiny.toml"
    toml.write_text('name = "tiny"\n[[layers]]\ntype = "conv"\nfilters = 8\n[[layers]]\ntype = "relu"\n'
                    '[[layers]]\ntype = "global_avgpool"\n[[layers]]\ntype = "dense"\nunits = 10\n')
    tiny = M.build_model(str(toml))
    assert tiny.num_parameters() == 8 * 27 + 8 + 80 + 10


@pytest.mark.parametrize("layers, message", [
    ([{"type": "conv", "filters": 8}, {"type": "dense", "units": 10}],
     r"layer 'dense_1' \(dense\) on input \(8, 32, 32\): needs a flat input; add a 'flatten' layer"),
    ([{"type": "flatten"}, {"type": "dense", "units": 7}], r"outputs \(7,\); expected \(10,\) for 10 classes"),
    ([{"type": "convolution", "filters": 8}], r"layer 0: unknown type 'convolution'"),
    ([{"type": "conv", "filters": 8, "kernal": 3}], r"unknown key\(s\) \['kernal'\]"),
    ([{"type": "conv"}], r"missing required key 'filters'"),
    ([{"type": "conv", "filters": "8"}], r"'filters' must be int, not str"),
    ([{"type": "conv", "filters": 8, "kernel": 4}], r"padding 'same' needs an odd kernel"),
    ([{"type": "maxpool", "size": 2}] * 6 + [{"type": "flatten"}, {"type": "dense", "units": 10}],
     r"pool size 2 is larger than the input"),
    ([{"type": "flatten"}, {"type": "conv", "filters": 3}], r"needs an image-shaped input"),
    ([{"type": "conv", "filters": 10 ** 12}], r"'filters' = 1000000000000 is outside 1..8192"),
    ([{"type": "dropout", "rate": 1.5}], r"'rate' = 1.5 is outside"),
])
def test_declaration_errors_name_the_layer(layers, message):
    with pytest.raises(DeclarationError, match=message):
        M.validate({"name": "bad", "layers": layers}, num_classes=10)  # validated for a 10-class dataset


def test_declaration_structure_errors(tmp_path):
    with pytest.raises(DeclarationError, match="unknown top-level key"):
        M.validate({"layers": [], "optimizer": "sgd"})
    with pytest.raises(DeclarationError, match="non-empty list"):
        M.validate({"layers": []})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DeclarationError, match=r"broken\.json: not valid JSON"):
        M.get_declaration(str(broken))
    with pytest.raises(DeclarationError, match="unknown model 'resnet9000'"):
        M.get_declaration("resnet9000")


def test_registry_accepts_new_architectures():
    M.register_model("tiny_test", {"layers": [{"type": "global_avgpool"}, {"type": "dense", "units": 10}]})
    try:
        assert M.build_model("tiny_test").num_parameters() == 40
    finally:
        del M.MODELS["tiny_test"]


def test_whitening_layer_whitens_patches(cifar):
    from cifarlab.transforms import Normalization

    model = M.build_model("fast")
    x = Normalization.named("standard")(cifar.train.images[:2000])
    model.init_from_data(x)
    out = model.whiten(x)[:, :12]  # the first half: the eigenvector filters (the rest are their negatives)
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1).double())
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 1e-3  # decorrelated
    # Unit variance, except where eps (the regularizer) damps the weakest directions.
    assert torch.diag(cov).max() <= 1.001 and (torch.diag(cov) > 0.95).sum() >= 8 and torch.diag(cov).min() > 0.5
    assert not model.whiten.weight.requires_grad


def test_airbench94_declaration_has_airbenchs_init_and_fixed_batchnorm_scale():
    torch.manual_seed(0)
    net = M.build_model("airbench94")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and not isinstance(m, M.Whiten)]
    for conv in convs:  # the first C_in filters are the identity
        c_in = conv.in_channels
        identity = torch.zeros_like(conv.weight[:c_in])
        torch.nn.init.dirac_(identity)
        assert torch.equal(conv.weight[:c_in], identity)
        if conv.out_channels > c_in:  # the rest keep PyTorch's random init
            assert conv.weight[c_in:].abs().sum() > 0
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in norms)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    assert f"Non-trainable params: {frozen:,}" in M.summary(net)
    assert f"Non-trainable params: {frozen:,}" in M.summary(M.get_declaration("airbench94"))
