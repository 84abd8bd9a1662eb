"""explain.py: every attribution method's maps, faithfulness, sanity check and dataset examples rendered
for visualize, on a tiny declared net and a few synthetic images (fast)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cifarlab.explain import methods as attr
from cifarlab import explain
from cifarlab.explain import overview
from cifarlab import visualize as V
from cifarlab.data import Dataset, Split
from cifarlab.models import build_model
from cifarlab.transforms import Normalization

TINY = {"name": "tiny", "input_shape": [3, 16, 16], "layers": [
    {"type": "conv", "filters": 4, "kernel": 3, "padding": "same"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv", "filters": 6, "kernel": 3, "padding": "same"}, {"type": "relu"},
    {"type": "flatten"}, {"type": "dense", "units": "classes"}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    try:
        model = build_model(TINY, num_classes=3).eval()
    except Exception as e:  # the declaration format is models.py's; fail loudly if it changed
        pytest.fail(f"tiny declaration no longer builds: {e}")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,), generator=g)
    split = Split(images, labels)
    data = Dataset(train=split, test=split, classes=["a", "b", "c"], name="synthetic")
    norm = Normalization.named("exercise")
    ckpt = SimpleNamespace(model=model, path=tmp_path_factory.mktemp("ck"),
                           meta={"normalization": norm.to_dict(), "classes": data.classes})
    return ckpt, data, norm


QUICK = explain.ExplainSettings(faithfulness_images=10, faithfulness_steps=4, sanity_images=3, example_images=30)


def test_render_all_writes_every_explanation(tiny, tmp_path):
    ckpt, data, _ = tiny
    result = V.render_all(ckpt, tmp_path / "vis", data=data, settings=V.StimulusSettings(steps=2), images=[0, 5, 7],
                          log=lambda *a: None, explanations=QUICK)
    out = tmp_path / "vis"
    for name in ("attribution_methods", "faithfulness", "sanity"):
        assert name in result.files
    examples = sorted(k for k in result.files if k.startswith("examples_"))
    stimulus_layers = sorted(k[len("stimuli_"):] for k in result.files if k.startswith("stimuli_"))
    assert examples == sorted(f"examples_{n}" for n in stimulus_layers + ["classes"])
    for path in result.files.values():
        with Image.open(path) as im:
            assert im.width > 50 and im.height > 50
    summary = json.loads((out / "summary.json").read_text())["explanations"]
    assert summary == json.loads((out / "explanations.json").read_text())
    assert set(summary["faithfulness"]["methods"]) == set(attr.METHODS) == set(summary["sanity"]["methods"])
    assert summary["faithfulness"]["settings"]["n"] == 10 and summary["faithfulness"]["settings"]["steps"] == 4
    assert summary["sanity"]["n"] == 3 and summary["maps"]["images"] == [0, 5, 7]
    for layer, e in summary["examples"]["layers"].items():
        assert len(e["top_indices"]) == len(e["channels"]) and all(len(r) == explain.TOP_K for r in e["top_indices"])
        assert all(0 <= i < 30 for r in e["top_indices"] for i in r)
        assert len(e["stimulus_ratio"]) == len(e["channels"])
    # JSON numbers only: no NaN/Infinity tokens
    assert "NaN" not in (out / "explanations.json").read_text()


def test_grad_cam_layer_is_visualizes(tiny, tmp_path):
    ckpt, data, _ = tiny
    first_conv = next(n for n, m in ckpt.model.named_modules() if isinstance(m, torch.nn.Conv2d))
    small = explain.ExplainSettings(faithfulness_images=4, faithfulness_steps=2, sanity_images=2, example_images=0,
                                    methods=("grad_cam", "saliency"))
    files, summary = explain.render(ckpt.model, Normalization.named("exercise"), data, [0, 1], [], tmp_path, small,
                                    log=lambda *a: None, cam_layer=first_conv)
    assert summary["maps"]["layers"] == {"grad_cam": first_conv}
    assert set(summary["sanity"]["methods"]) == {"grad_cam", "saliency"}


def test_switches(tiny, tmp_path):
    ckpt, data, _ = tiny
    result = V.render_all(ckpt, tmp_path / "off", data=data, settings=V.StimulusSettings(steps=1), images=[0],
                          log=lambda *a: None, explanations=False)
    assert not any(k in result.files for k in ("attribution_methods", "faithfulness", "sanity"))
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["explanations"] == {"enabled": False}
    none = explain.ExplainSettings(faithfulness_images=0, sanity_images=0, example_images=0)
    result = V.render_all(ckpt, tmp_path / "some", data=data, settings=V.StimulusSettings(steps=1), images=[0],
                          log=lambda *a: None, explanations=none)
    assert "attribution_methods" in result.files
    assert not any(k.startswith("examples_") or k in ("faithfulness", "sanity") for k in result.files)


def test_colour_scale_is_fixed_per_method():
    signed = torch.tensor([[[-2.0, 1.0]], [[0.5, 4.0]]])
    vmin, vmax, cmap = overview.method_scale(signed)
    assert vmin == -vmax and cmap == "RdBu_r" and 3.5 < vmax <= 4.0
    vmin, vmax, cmap = overview.method_scale(signed.abs())
    assert vmin == 0 and cmap == "inferno"


def test_bad_settings():
    with pytest.raises(ValueError, match="faithfulness_steps"):
        explain.ExplainSettings(faithfulness_steps=1).validate()
    with pytest.raises(ValueError, match="unknown attribution"):
        explain.ExplainSettings(methods=("lime",)).validate()


def test_the_faithfulness_verdict_is_worded_per_metric():
    """Saliency's insertion can beat random while its deletion does not: one pooled "beats random" hid that."""
    row = {"vs_random": {"deletion": {"beats_random": False}, "insertion": {"beats_random": True}}}
    assert explain.faithfulness_verdict(row) == "beats random on insertion, not on deletion"
    assert explain.beats_random(row, "insertion") and not explain.beats_random(row, "deletion")
    assert not explain.beats_random(row)  # both metrics asked: no
    row["vs_random"]["insertion"]["beats_random"] = False
    assert explain.faithfulness_verdict(row) == "no better than random on deletion or insertion"
    row["vs_random"]["deletion"]["beats_random"] = row["vs_random"]["insertion"]["beats_random"] = True
    assert explain.faithfulness_verdict(row) == "beats random on deletion and insertion" and explain.beats_random(row)
    row["vs_random"]["insertion"]["beats_random"] = False
    assert explain.faithfulness_verdict(row) == "beats random on deletion, not on insertion"
