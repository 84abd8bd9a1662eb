"""cifarlab lr-find: the range test suggests an lr inside the tested range, trains nothing, writes its files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cifarlab.cli import main
from cifarlab.data import CIFAR10
from cifarlab.lr_find import default_steps, lr_find, lr_schedule, save, smooth, suggest
from cifarlab.train import recipe_from

TINY = {"name": "tiny", "layers": [{"type": "conv", "filters": 8}, {"type": "relu"}, {"type": "maxpool", "size": 4},
                                   {"type": "flatten"}, {"type": "dense", "units": "classes"}]}


def test_schedule_and_smoothing():
    lrs = lr_schedule(1e-7, 10, 100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias correction: no pull toward 0
    # a loss that falls fastest around lr 1e-3 and blows up after 1e-1
    x = torch.linspace(-7, 1, 81)
    loss = 2.3 - torch.sigmoid((x + 3) * 3) + torch.relu(x + 1) ** 2
    steepest, lowest = suggest((10 ** x).tolist(), loss.tolist())
    assert 10 ** -3.3 < steepest < 10 ** -2.7
    assert 10 ** -2 < lowest < 10 ** -0.5


def test_default_steps_show_the_net_enough_images():
    assert default_steps(32) == 400      # 12,800 images at the exercise's batch
    assert default_steps(1024) == 100    # never fewer than 100 steps
    assert default_steps(2000) == 100 and default_steps(64) == 200


def test_range_test_on_a_tiny_net(cifar, tmp_path, one_thread):
    data = CIFAR10(cifar.train.subset(slice(0, 512)), cifar.test.subset(slice(0, 10)), cifar.classes)
    torch.manual_seed(0)
    from cifarlab.models import Net, get_declaration

    model = Net(get_declaration(TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = lr_find(recipe_from("exercise"), data, model=model, steps=40, start_lr=1e-5, end_lr=100.0,
                     log=lambda *a: None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert 1e-5 <= result.min_loss_lr <= 100.0 and result.min_loss_lr in result.lrs
    assert result.suggestion == pytest.approx(result.min_loss_lr / 10)  # fastai's "minimum" rule
    assert result.steepest_lr in result.lrs and result.steepest_lr <= result.min_loss_lr
    assert result.stopped_early  # Adamax at lr 100 diverges
    assert all(math.isfinite(v) for v in result.smoothed)
    files = save(result, tmp_path / "out")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(files["json"].read_text())
    assert saved["suggestion"] == result.suggestion and len(saved["lrs"]) == len(saved["losses"])


def test_lr_find_command(data_dir, tmp_path, capsys, one_thread):
    decl = tmp_path / "tiny.json"
    decl.write_text(json.dumps(TINY))
    out = tmp_path / "lrf"
    code = main(["lr-find", "--model", str(decl), "--steps", "20", "--start-lr", "1e-4", "--end-lr", "10",
                 "--data-dir", str(data_dir), "--no-download", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "suggested_lr" in printed and "cifarlab train --preset exercise --lr" in printed
    saved = json.loads((out / "lr_find.json").read_text())
    assert 1e-5 <= saved["suggestion"] <= 1 and (out / "lr_find.png").stat().st_size > 1000
    assert saved["suggestion"] == pytest.approx(saved["min_loss_lr"] / 10) and len(saved["lrs"]) <= 20
    assert main(["lr-find", "--start-lr", "1", "--end-lr", "0.1", "--data-dir", str(data_dir), "--no-download",
                 "--out", str(out)]) == 2


@pytest.mark.parametrize("below", ["", "sub/deeper"])
def test_a_file_in_the_way_of_out_is_refused_before_anything_runs(tmp_path, capsys, below):
    """Before: lr-find trained for its steps and only then failed to write. The data folder here does not
    exist, so an error about --out proves the check came first (and nothing was written)."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_bytes(b"mine")
    out = in_the_way / below if below else in_the_way
    code = main(["lr-find", "--preset", "fast", "--steps", "5", "--data-dir", str(tmp_path / "no-such-data"),
                 "--no-download", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {in_the_way}: exists and is not a folder; choose another --out for the lr " \
                                f"finder's results\n"
    assert in_the_way.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
