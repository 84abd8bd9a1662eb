"""Residual blocks declared as data: shape checks and hostile declarations, building (module names are
the dotted declaration names), training with exact resume, evaluation, prediction, ONNX export, the
built-in resnet18 / airbench96, and visualization of a residual net by layer name.

Nets here are tiny (8-16 channels) and train a few dozen steps on a few hundred real CIFAR-10 images.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from cifarlab import checkpoints as C
from cifarlab import models as M
from cifarlab import explain
from cifarlab import visualize as V
from cifarlab.data import CIFAR10
from cifarlab.errors import DeclarationError
from cifarlab.evaluate import evaluate_model, predict_logits
from cifarlab.train import recipe_from, train
from cifarlab.transforms import Normalization


def quiet(*args, **kwargs):
    pass


def _block(name, filters, stride, shortcut):
    body = [{"type": "conv", "name": "conv1", "filters": filters, "stride": stride, "padding": 1, "bias": False},
            {"type": "batchnorm", "name": "bn1"}, {"type": "relu", "name": "relu1"},
            {"type": "conv", "name": "conv2", "filters": filters, "bias": False},
            {"type": "batchnorm", "name": "bn2"}]
    return [{"type": "residual", "name": name, "body": body, "shortcut": shortcut},
            {"type": "relu", "name": f"{name}_relu"}]


def _net(name, shortcut_kind):
    stem = [{"type": "conv", "name": "stem", "filters": 8, "bias": False}, {"type": "batchnorm", "name": "stem_bn"},
            {"type": "relu", "name": "stem_relu"}, {"type": "maxpool", "name": "stem_pool"}]
    if shortcut_kind == "projection":  # width 8 -> 16 and stride 2: a 1x1 conv + batchnorm shortcut
        block = _block("block1", 16, 2, [
            {"type": "conv", "name": "proj", "filters": 16, "kernel": 1, "stride": 2, "padding": 0, "bias": False},
            {"type": "batchnorm", "name": "proj_bn"}])
    else:
        block = _block("block1", 8, 1, [])
    head = [{"type": "global_avgpool", "name": "pool"}, {"type": "dropout", "name": "drop", "rate": 0.1},
            {"type": "dense", "name": "fc", "units": "classes"}]
    return {"name": name, "init": "torch", "layers": stem + block + head}


PROJECTION = _net("res_projection", "projection")
IDENTITY = _net("res_identity", "identity")


def small(cifar, n_train=384, n_test=200) -> CIFAR10:
    return CIFAR10(cifar.train.subset(slice(0, n_train)), cifar.test.subset(slice(0, n_test)), cifar.classes)


# ---------------------------------------------------------------------------------------------------
# Declarations and building


@pytest.mark.parametrize("decl", [PROJECTION, IDENTITY], ids=["projection", "identity"])
def test_blocks_build_with_dotted_module_names_and_counted_parameters(decl):
    model = M.build_model(decl)
    modules = dict(model.named_modules())
    infos = M.layers(model.declaration)
    assert all(info.name in modules for info in infos)  # every declared layer, by its dotted name
    assert isinstance(modules["block1"], M.Residual)
    assert isinstance(modules["block1.conv2"], torch.nn.Conv2d)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # The arithmetic count equals the built model's, and the block's row counts its layers.
    assert M.count_parameters(decl) == model.num_parameters()
    block = next(info for info in infos if info.name == "block1")
    assert block.params == sum(p.numel() for p in modules["block1"].parameters())
    text = M.summary(model)
    assert f"Total params: {model.num_parameters():,}" in text
    assert "  block1.conv1 (conv)" in text
    if decl is PROJECTION:
        assert "block1.proj (conv, shortcut)" in text and "(None, 16, 8, 8)" in text
        assert modules["block1"].shortcut_names == ("proj", "proj_bn")
    else:
        assert "block1 (residual, identity shortcut)" in text


def test_residual_output_is_body_plus_shortcut():
    torch.manual_seed(0)
    model = M.build_model(PROJECTION).eval()
    block = model.block1
    x = torch.randn(3, 8, 16, 16)
    body = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), body + block.proj_bn(block.proj(x)))
    ident = M.build_model(IDENTITY).eval().block1
    y = torch.randn(3, 8, 16, 16)
    torch.testing.assert_close(ident(y), ident.bn2(ident.conv2(ident.relu1(ident.bn1(ident.conv1(y))))) + y)


def test_validation_is_idempotent_and_state_dict_keys_follow_the_names():
    decl = M.validate(PROJECTION)
    assert M.validate(copy.deepcopy(decl)) == decl
    keys = set(M.build_model(decl).state_dict())
    assert {"block1.conv1.weight", "block1.proj.weight", "block1.proj_bn.running_mean", "fc.weight"} <= keys
    # Blocks without names get block-local default names.
    anonymous = {"layers": [{"type": "conv", "filters": 4}, {"type": "residual", "body": [{"type": "conv", "filters": 4}]},
                            {"type": "flatten"}, {"type": "dense", "units": 10}]}
    names = [info.name for info in M.layers(M.validate(anonymous))]
    assert names == ["conv_1", "residual_1", "residual_1.conv_1", "flatten_1", "dense_1"]


def _with_block(block: dict) -> dict:
    return {"layers": [{"type": "conv", "name": "stem", "filters": 8}, block, {"type": "flatten"},
                       {"type": "dense", "units": 10}]}


def _nested(depth: int) -> dict:
    block = {"type": "residual", "name": "b", "body": [{"type": "relu"}]}
    for _ in range(depth - 1):
        block = {"type": "residual", "name": "b", "body": [block]}
    return _with_block(block)


@pytest.mark.parametrize("decl, message", [
    (_with_block({"type": "residual", "name": "down", "body": [{"type": "conv", "filters": 16, "stride": 2,
                                                                  "padding": 1}]}),
     r"residual block 'down' on input \(8, 32, 32\): its body outputs \(16, 16, 16\) but its identity shortcut "
     r"\(the block's input\) gives \(8, 32, 32\); the two must have the same shape to be added; a projection "
     r"shortcut would be \[\{\"type\": \"conv\", \"filters\": 16, \"kernel\": 1, \"stride\": 2"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "conv", "filters": 8}],
                  "shortcut": [{"type": "maxpool"}]}),
     r"residual block 'b' on input \(8, 32, 32\): its body outputs \(8, 32, 32\) but its shortcut gives "
     r"\(8, 16, 16\)"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "conv", "filters": 8}], "merge": "add"}),
     r"layer 1 'b' \(residual\): unknown key\(s\) \['merge'\]; allowed: \['body', 'shortcut'\]"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "conv", "filters": 8, "kernal": 3}]}),
     r"layer b.body\[0\] 'b.conv_1' \(conv\): unknown key\(s\) \['kernal'\]"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "convolution"}]}),
     r"layer b.body\[0\]: unknown type 'convolution'"),
    (_with_block({"type": "residual", "name": "b", "body": []}), r"'body' must be a non-empty list"),
    (_with_block({"type": "residual", "name": "b"}), r"missing required key 'body'"),
    (_with_block({"type": "residual", "name": "b", "body": {"type": "relu"}}), r"'body' must be a list of layers"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "relu", "name": "x"}],
                  "shortcut": [{"type": "relu", "name": "x"}]}), r"name 'x' must be a unique identifier within its block"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "relu", "name": "body_names"}]}),
     r"name 'body_names' is reserved"),
    (_with_block({"type": "relu", "name": "forward"}), r"name 'forward' is reserved"),
    (_nested(M.MAX_DEPTH + 1), rf"residual blocks nested more than {M.MAX_DEPTH} deep"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "relu"}] * (M.MAX_LAYERS - 1)}),
     r"b.body: more than the 512 layers allowed \(counting the layers inside blocks\)"),
    ({"layers": [{"type": "residual", "name": "b", "body": [{"type": "relu"}] * 20}] + [{"type": "relu"}] * 500
      + [{"type": "flatten"}, {"type": "dense", "units": 10}]},
     r"layer 492: more than the 512 layers allowed \(counting the layers inside blocks\)"),
    (_with_block({"type": "residual", "name": "b", "body": [{"type": "residual", "name": "c", "body": [
        {"type": "conv", "filters": 8192}, {"type": "conv", "filters": 8192}, {"type": "conv", "filters": 8}]}]}),
     r"layer b.c.body\[1\] 'b.c.conv_2' \(conv\): the model would exceed 500,000,000 parameters"),
])
def test_hostile_residual_declarations_are_refused_clearly(decl, message):
    with pytest.raises(DeclarationError, match=message):
        M.validate(decl)


def test_a_nesting_bomb_is_refused_without_recursing_into_it():
    decl = _nested(M.MAX_DEPTH)
    M.validate(decl)  # the limit itself is fine
    block = {"type": "residual", "name": "b", "body": [{"type": "relu"}]}
    for _ in range(100_000):  # far deeper than Python's recursion limit
        block = {"type": "residual", "name": "b", "body": [block]}
    with pytest.raises(DeclarationError, match="nested more than"):
        M.validate(_with_block(block))


def test_a_nesting_bomb_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bomb.json"
    path.write_text('{"layers": [' + '{"type": "residual", "body": [' * 50_000 + "]}" * 50_000 + "]}")
    with pytest.raises(DeclarationError, match="bomb.json"):
        M.load_declaration_file(path)


def test_resnet18_has_the_standard_parameter_count(capsys):
    from cifarlab.cli import main

    assert M.count_parameters(M.MODELS["resnet18"]) == 11_173_962
    assert main(["summary", "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 11,173,962" in out
    assert "layer2_1.down_conv (conv, shortcut)" in out and "(None, 512, 4, 4)" in out
    model = M.build_model("resnet18", num_classes=100)
    assert model.num_parameters() == 11_173_962 + 90 * 513  # the head adapts to the classes
    assert "layer4_2.conv2" in dict(model.named_modules())


def test_airbench96_declaration():
    decl = M.get_declaration("airbench96")
    infos = {info.name: info for info in M.layers(decl)}
    assert infos["g2_res"].output_shape == (512, 7, 7) and infos["g3_res"].output_shape == (512, 3, 3)
    assert [i.name for i in M.layers(decl) if i.type == "conv"] == [
        "g1_conv1", "g1_res.conv2", "g1_res.conv3", "g2_conv1", "g2_res.conv2", "g2_res.conv3",
        "g3_conv1", "g3_res.conv2", "g3_res.conv3"]  # + the whitening conv: airbench96's 10 convs
    model = M.Net(decl)
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv2d]
    assert all(torch.equal(c.weight[:c.in_channels, :, 1, 1], torch.eye(c.in_channels)) for c in convs)
    from cifarlab.recipes import PRESETS

    r = PRESETS["airbench96"]
    assert (r.model, r.epochs, r.batch_size, r.translate, r.cutout, r.tta) == ("airbench96", 31, 1024, 4, 12, 2)


# ---------------------------------------------------------------------------------------------------
# Train, resume exactly, evaluate, predict, export


@pytest.mark.parametrize("decl", [PROJECTION, IDENTITY], ids=["projection", "identity"])
def test_train_resume_bitwise_evaluate_predict_export(decl, cifar, tmp_path):
    pytest.importorskip("onnxruntime")
    from cifarlab.export import compare_with_torch, export_onnx
    from cifarlab.predict import predict_images

    data = small(cifar)
    path = tmp_path / f"{decl['name']}.json"
    path.write_text(json.dumps(decl))
    recipe = recipe_from("fast", model=str(path), epochs=2, batch_size=64, tta=0)  # 6 steps an epoch
    full = train(recipe, data, tmp_path / "full", progress=False, log=quiet)
    train(recipe, data, tmp_path / "part", progress=False, log=quiet, max_steps=8)  # mid epoch 2
    resumed = train(recipe, data, tmp_path / "part", progress=False, log=quiet, resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert "block1.conv1.weight" in full.model.state_dict()
    ckpt = C.load_checkpoint(tmp_path / "full" / "final")
    assert ckpt.meta["weights_sha256"] == C.load_checkpoint(tmp_path / "part" / "final").meta["weights_sha256"]
    assert ckpt.model.declaration == full.model.declaration  # rebuilt from the stored declaration

    norm = Normalization.from_dict(ckpt.meta["normalization"])
    ev = evaluate_model(ckpt.model, data.test.images, data.test.labels, data.classes, norm)
    assert 0.0 <= ev.accuracy <= 1.0 and ev.logits.shape == (len(data.test), 10)
    torch.testing.assert_close(torch.from_numpy(ev.logits), predict_logits(full.model, data.test.images, norm))

    rows = predict_images(ckpt, data.test.images[:4], top_k=3)
    assert [row[0]["class"] for row in rows] == [data.classes[i] for i in ev.predictions[:4]]

    report = export_onnx(ckpt, tmp_path / "model.onnx")
    assert report["verified"]["max_abs_logit_diff"] < 1e-4
    check = compare_with_torch(tmp_path / "model.onnx", ckpt, data.test.images[:64])
    assert check["same_predictions"] and check["max_abs_logit_diff"] < 1e-4


def test_whitening_inside_a_block_is_initialized_from_data(cifar):
    decl = {"layers": [{"type": "residual", "name": "b", "body": [{"type": "whiten", "name": "w"},
                                                                  {"type": "conv", "filters": 3, "kernel": 1}],
                        "shortcut": [{"type": "avgpool", "size": 2, "stride": 1}]},
                       {"type": "global_avgpool"}, {"type": "dense", "units": 10}]}
    model = M.build_model(decl)
    assert M.has_layer_type(model.declaration, "whiten")
    model.init_from_data(Normalization.named("standard")(cifar.train.images[:200]))
    assert model.b.w.weight.abs().sum() > 0 and not model.b.w.weight.requires_grad


# ---------------------------------------------------------------------------------------------------
# Visualization by layer name


@pytest.fixture(scope="module")
def resnet_tiny(cifar, tmp_path_factory):
    """The projection net, a few steps trained, and a second block (identity) for two block targets."""
    decl = copy.deepcopy(PROJECTION)
    decl["layers"][-3:-3] = _block("block2", 16, 1, [])
    root = tmp_path_factory.mktemp("res_vis")
    (root / "net.json").write_text(json.dumps(decl))
    torch.manual_seed(0)
    train(recipe_from("fast", model=str(root / "net.json"), epochs=1, batch_size=64, tta=0), small(cifar), root / "run",
          progress=False, log=quiet)
    return root / "run"


def test_stimuli_per_block_output_and_grad_cam_by_name(resnet_tiny, cifar):
    ckpt = C.load_checkpoint(resnet_tiny / "final")
    model, norm = ckpt.model.eval(), Normalization.from_dict(ckpt.meta["normalization"])
    targets = V.stimulus_targets(model)
    assert [(t.name, t.conv, t.kind, t.channels) for t in targets] == [
        ("stem_relu", "stem", "conv", 8), ("block1_relu", "block1", "block", 16),
        ("block2_relu", "block2", "block", 16), ("classes", "", "class", 10)]
    # A stimulus raises its channel above where it started, through the residual blocks.
    target = targets[2]
    start = V.maximum_stimuli(model, target, norm, V.StimulusSettings(steps=0), channels=[3])
    found = V.maximum_stimuli(model, target, norm, V.StimulusSettings(steps=12), channels=[3])
    assert found.objective[0] > start.objective[0]
    # Stopping the forward pass at the target gives the same images as running the whole net.
    V.STOP_EARLY = False
    try:
        whole = V.maximum_stimuli(model, target, norm, V.StimulusSettings(steps=12), channels=[3])
    finally:
        V.STOP_EARLY = True
    assert torch.equal(whole.images, found.images)

    maps = V.activation_maps(model, cifar.test.images[0], norm)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "stem_relu": (8, 32, 32), "block1_relu": (16, 8, 8), "block2_relu": (16, 8, 8)}
    inner = V.activation_maps(model, cifar.test.images[0], norm, layers=["block1.conv1", "block1.proj"])
    assert tuple(inner["block1.proj"].shape) == (16, 8, 8)

    images = cifar.test.images[:4]
    assert V.default_cam_layer(model) == "block2_relu"
    cam = explain.attribute("grad_cam", model, images, norm)  # the one registry: the same default layer
    assert cam.layer == "block2_relu" and cam.maps.shape == (4, 32, 32) and float(cam.maps.min()) >= 0
    classes = cam.targets
    cam_inner = explain.attribute("grad_cam", model, images, norm, target=classes, layer="block1.conv2")
    assert cam_inner.maps.shape == (4, 32, 32)
    # By hand: the gradient of the logit with respect to block2's output (after its ReLU).
    feats = {}
    handle = model.block2_relu.register_forward_hook(lambda m, a, out: feats.setdefault("f", out))
    logits = model(norm(images[:1]))
    handle.remove()
    (g,) = torch.autograd.grad(logits[0, int(classes[0])], feats["f"])
    by_hand = torch.relu((g.mean((2, 3), keepdim=True) * feats["f"]).sum(1))[0].detach()
    small_cam = torch.nn.functional.avg_pool2d(cam.maps[:1, None], 4)[0, 0]
    assert torch.corrcoef(torch.stack([small_cam.flatten(), by_hand.flatten()]))[0, 1] > 0.95
    with pytest.raises(V.VisualizationError, match="no layer named 'block9'"):
        explain.attribute("grad_cam", model, images, norm, layer="block9")
    with pytest.raises(V.VisualizationError, match=r"needs a layer with a \(C, H, W\) output; 'fc' outputs \(10,\)"):
        explain.attribute("grad_cam", model, images, norm, layer="fc")


def test_cli_visualize_a_residual_net_with_a_named_layer(resnet_tiny, data_dir, tmp_path):
    from cifarlab.cli import main

    out = tmp_path / "vis"
    assert main(["visualize", str(resnet_tiny), "--steps", "2", "--out", str(out), "--images", "0", "1",
                 "--layer", "block1.conv2", "--max-channels", "4", "--data-dir", str(data_dir)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradcam_layer"] == "block1.conv2" and summary["max_channels"] == 4
    assert {p.name for p in out.glob("stimuli_*.png")} == {
        "stimuli_stem_relu.png", "stimuli_block1_relu.png", "stimuli_block2_relu.png"}
    assert (out / "saliency_gradcam.png").is_file() and (out / "activations.png").is_file()
    assert main(["visualize", str(resnet_tiny), "--layer", "nope", "--out", str(tmp_path / "v2"),
                 "--data-dir", str(data_dir)]) == 2
