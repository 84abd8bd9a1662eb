"""Budgets that fit the data, and fine-tuning from earlier weights: real runs, real files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cifarlab import checkpoints as C
from cifarlab.budget import FEW_STEPS, fit_budget, plan_for
from cifarlab.cli import main as cli_main
from cifarlab.data import CIFAR10, Split
from cifarlab.errors import CheckpointError
from cifarlab.finetune import body_parameters, init_model, layer_group_scales, torchvision_to_cifarlab
from cifarlab.models import build_model
from cifarlab.recipes import PRESETS, recipe_from
from cifarlab.train import make_optimizer, train


def quiet(*args, **kwargs):
    pass


def subset(cifar, n_train, n_test=100, classes=None) -> CIFAR10:
    """The first images of the chosen classes (relabelled 0..k-1), or of all ten."""
    def pick(split, n):
        if classes is None:
            return split.subset(slice(0, n))
        keep = torch.isin(split.labels, torch.tensor(classes)).nonzero().flatten()[:n]
        remap = {c: i for i, c in enumerate(classes)}
        return Split(split.images[keep], torch.tensor([remap[int(y)] for y in split.labels[keep]]))
    names = cifar.classes if classes is None else [cifar.classes[c] for c in classes]
    return CIFAR10(pick(cifar.train, n_train), pick(cifar.test, n_test), names)


# ---------------------------------------------------------------------------------------------------
# Budgets


def test_the_fast_preset_budget_fits_small_and_leaves_cifar_alone():
    fast = PRESETS["fast"]
    same, plan = fit_budget(fast, 50_000)
    assert same == fast and plan.steps == 3 * 196 and not plan.changes
    small, plan = fit_budget(fast, 245)
    assert (small.batch_size, small.epochs) == (32, 63) and plan.steps == 504 >= fast.min_steps
    assert small.lr == pytest.approx(0.2 * 32 / 256)  # SGD: lr follows the batch
    assert "245 training images, batch 32, 63 epochs = 504 optimizer steps" in plan.describe()
    assert fit_budget(small, 245)[0] == small  # idempotent: a resumed run keeps its recipe


def test_explicit_choices_stand_and_few_steps_are_warned_about():
    recipe, plan = fit_budget(recipe_from("fast", epochs=2, batch_size=128), 245,
                              explicit={"epochs", "batch_size"})
    assert (recipe.epochs, recipe.batch_size) == (2, 128) and plan.steps == 4
    assert "only 4 optimizer steps" in plan.warning() and FEW_STEPS > 4
    tiny, plan = fit_budget(PRESETS["fast"], 10)  # ten images: the smallest batch, still 500 steps
    assert tiny.batch_size == 8 and plan.steps >= 500
    assert plan_for(PRESETS["exercise"], 245).warning()  # the exercise preset has no budget: 80 steps


def test_cli_trains_ten_images_with_the_fast_preset_and_prints_the_plan(cifar, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "ten"
    for part, count in (("train", 5), ("test", 2)):  # 10 training images, two classes
        for c in ("c0", "c1"):
            (folder / part / c).mkdir(parents=True)
            for i in range(count):
                index = (0 if part == "train" else 100) + (50 if c == "c1" else 0) + i
                pixels = cifar.train.images[index].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / part / c / f"{i}.png")
    code = cli_main(["train", "--preset", "fast", "--dataset", f"folder:{folder}", "--runs-dir", str(tmp_path / "r"),
                     "--name", "t", "--no-progress", "--threads", "1", "--max-steps", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "batch 256 -> 8" in out and "10 training images, batch 8, 250 epochs = 500 optimizer steps" in out
    assert C.load_latest(tmp_path / "r" / "t", with_train_state=True).train_state["recipe"]["batch_size"] == 8


def test_freeze_epochs_without_a_net_to_load_is_refused_not_silently_applied(tmp_path, capsys):
    """Before: --freeze-epochs on a net from scratch trained only the head on random features, silently."""
    with pytest.raises(ValueError, match="freeze_epochs trains only the head of a loaded net"):
        recipe_from("fast", freeze_epochs=2).validate()
    code = cli_main(["train", "--preset", "fast", "--freeze-epochs", "2", "--data-dir", str(tmp_path / "none"),
                     "--no-download", "--runs-dir", str(tmp_path / "r")])
    assert code == 2 and "pass init_from (--init-from RUN_OR_FILE), or drop freeze_epochs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


@pytest.fixture(scope="module")
def cifar_run(cifar, tmp_path_factory):
    """A short fast-net run on all ten CIFAR-10 classes: the source to fine-tune from."""
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("source") / "run"
    train(recipe_from("fast", epochs=1, batch_size=128, tta=0), subset(cifar, 2000, 200), folder, log=quiet,
          progress=False)
    return folder


def test_init_from_a_run_with_other_classes_replaces_the_head_and_says_so(cifar, cifar_run, tmp_path):
    two = subset(cifar, 256, 64, classes=[3, 5])  # cat vs dog
    recipe = recipe_from("fast", epochs=1, batch_size=64, tta=0, init_from=str(cifar_run))
    lines = []
    result = train(recipe, two, tmp_path / "ft", log=lambda *a: lines.append(" ".join(map(str, a))), progress=False,
                   max_steps=1)
    text = "\n".join(lines)
    assert "new     head.weight: the source's classes differ (airplane, automobile, bird, cat, ...)" in text
    init = result.meta["init_from"]
    source = C.load_checkpoint(cifar_run / "final")
    assert init["source"] == str(cifar_run) and "head.weight" not in init["loaded"]
    assert "g1_conv1.weight" in init["loaded"] and "whiten.weight" in init["loaded"]
    # Loaded tensors are the source's (checked before training moved them: a zero-lr copy).
    copy = build_model(recipe.model, num_classes=2)
    init_model(copy, cifar_run, classes=two.classes)
    assert torch.equal(copy.state_dict()["g2_conv2.weight"], source.model.state_dict()["g2_conv2.weight"])
    assert result.normalization.to_dict() == source.meta["normalization"]  # the weights expect it


def test_same_class_count_but_other_classes_still_replaces_the_head(cifar, cifar_run):
    model = build_model("fast", num_classes=10)
    before = model.state_dict()["head.weight"].clone()
    report = init_model(model, cifar_run, classes=[f"x{i}" for i in range(10)])
    assert ("head.weight" in dict(report.new)) and "classes differ" in dict(report.new)["head.weight"]
    assert torch.equal(model.state_dict()["head.weight"], before)
    same = init_model(build_model("fast", num_classes=10), cifar_run, classes=list(cifar.classes))
    assert "head.weight" in same.loaded


def test_wrong_shapes_everywhere_are_refused_and_nothing_is_written(cifar, tmp_path):
    weights = tmp_path / "wrong.safetensors"
    save_file({"g1_conv1.weight": torch.zeros(5, 5), "other": torch.zeros(3)}, weights)
    recipe = recipe_from("fast", epochs=1, init_from=str(weights))
    with pytest.raises(CheckpointError, match="no weight of the source fits this model"):
        train(recipe, subset(cifar, 256), tmp_path / "never", log=quiet, progress=False)
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())


def test_pickles_and_damaged_files_are_refused_without_unpickling(tmp_path):
    pt = tmp_path / "w.pth"
    pt.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="safetensors only"):
        init_model(build_model("fast"), pt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        init_model(build_model("fast"), bad)
    nan = tmp_path / "nan.safetensors"
    save_file({"g1_conv1.weight": torch.full((32, 24, 3, 3), float("nan"))}, nan)
    with pytest.raises(CheckpointError, match="NaN"):
        init_model(build_model("fast"), nan)


def test_a_torchvision_resnet18_layout_loads_onto_resnet18(tmp_path):
    # A state dict with torchvision's ResNet-18 names and shapes (ImageNet: 7x7 stem, 1000 classes).
    ours = build_model("resnet18", num_classes=2).state_dict()
    tv = {}
    for name, value in ours.items():
        tv_name = name
        for stage in range(1, 5):
            for block in (1, 2):
                tv_name = tv_name.replace(f"layer{stage}_{block}.", f"layer{stage}.{block - 1}.")
        tv_name = tv_name.replace("down_conv.", "downsample.0.").replace("down_bn.", "downsample.1.")
        tv[tv_name] = torch.randn(value.shape) if value.is_floating_point() else value.clone()
    tv["conv1.weight"] = torch.randn(64, 3, 7, 7)
    tv["fc.weight"], tv["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18_tv.safetensors"
    save_file(tv, path)
    assert torchvision_to_cifarlab("layer2.0.downsample.1.running_mean") == "layer2_1.down_bn.running_mean"
    model = build_model("resnet18", num_classes=2)
    report = init_model(model, path)
    assert set(dict(report.new)) == {"conv1.weight", "fc.weight", "fc.bias"}
    assert torch.equal(model.state_dict()["layer3_1.down_conv.weight"], tv["layer3.0.downsample.0.weight"])
    assert report.kind == "safetensors state dict" and len(report.loaded) == len(ours) - 3


def test_freeze_then_unfreeze_with_discriminative_rates(cifar, cifar_run, tmp_path):
    recipe = recipe_from("fast", epochs=2, batch_size=64, tta=0, init_from=str(cifar_run), freeze_epochs=1,
                         lr_mult=100)
    two = subset(cifar, 256, 64, classes=[3, 5])
    snapshots = {}

    from cifarlab.train import Callback

    class Watch(Callback):
        def epoch_end(self, t):
            snapshots[t.epoch] = {k: v.clone() for k, v in t.model.state_dict().items()}

    lines = []
    result = train(recipe, two, tmp_path / "ft", log=lambda *a: lines.append(" ".join(map(str, a))), progress=False,
                   callbacks=[Watch()])
    start = build_model("fast", num_classes=2)
    init_model(start, cifar_run, classes=two.classes)
    frozen = [n for n, p in start.named_parameters()
              if any(p is q for q in body_parameters(start))]
    assert "g1_conv1.weight" in frozen and "head.weight" not in frozen and "g1_bn1.bias" not in frozen
    for name in frozen:  # epoch 1: the body did not move; epoch 2 it did
        assert torch.equal(snapshots[0][name], start.state_dict()[name]), name
    assert not torch.equal(snapshots[1]["g3_conv2.weight"], snapshots[0]["g3_conv2.weight"])
    assert not torch.equal(snapshots[0]["head.weight"], start.state_dict()["head.weight"])
    assert any("unfreezing" in line for line in lines)
    # Discriminative rates: three layer groups at lr/100, lr/10, lr (the head).
    scales = layer_group_scales(start, 100)
    params = dict(start.named_parameters())
    assert scales[id(params["g1_conv1.weight"])] == pytest.approx(0.01)
    assert scales[id(params["g3_conv2.weight"])] == pytest.approx(0.1)
    assert scales[id(params["head.weight"])] == 1.0
    groups = make_optimizer(recipe, start).param_groups
    assert sorted({round(g["lr_scale"], 6) for g in groups}) == [0.01, 0.1, 1.0]
    assert result.history[-1]["epoch"] == 2


def test_a_fine_tuning_run_resumes_exactly(cifar, cifar_run, tmp_path):
    recipe = recipe_from("fast", epochs=2, batch_size=64, tta=0, init_from=str(cifar_run), freeze_epochs=1,
                         lr_mult=100)
    two = subset(cifar, 256, 64, classes=[3, 5])
    full = train(recipe, two, tmp_path / "full", log=quiet, progress=False)
    train(recipe, two, tmp_path / "part", log=quiet, progress=False, max_steps=5)  # inside the frozen epoch
    resumed = train(recipe, two, tmp_path / "part", log=quiet, progress=False, resume=True)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert C.load_checkpoint(tmp_path / "part" / "final").meta["init_from"]["source"] == str(cifar_run)
