"""``cifarlab compare``: two tiny real runs side by side (table, CSV, curves, recipe differences, HTML)."""
from __future__ import annotations

import csv
import json
import re
import shlex
import shutil

import numpy as np
import pytest

from cifarlab import checkpoints, cli, compare, pipeline
from cifarlab.data import CIFAR10
from cifarlab.models import build_model

HOSTILE_NAME = "=1+1 <b>$x^$"  # a spreadsheet formula, markup and mathtext in one folder name

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(cifar, test: int) -> CIFAR10:
    return CIFAR10(train=cifar.train.subset(slice(0, 1000)), test=cifar.test.subset(slice(0, test)),
                   classes=cifar.classes, root=cifar.root)


@pytest.fixture(scope="module")
def runs(cifar, tmp_path_factory):
    """Two runs of the exercise net, 2 epochs on 1,000 images, with different learning rates and batch
    sizes; the first evaluated on 300 test images, the second not evaluated."""
    import torch

    from cifarlab.train import recipe_from, train

    root = tmp_path_factory.mktemp("compare")
    a, b = root / "lr-5e-3", root / HOSTILE_NAME
    torch.manual_seed(0)
    train(recipe_from("exercise", epochs=2), _small(cifar, 300), a, progress=False, log=lambda *x, **k: None)
    train(recipe_from("exercise", epochs=2, lr=0.01, batch_size=64), _small(cifar, 300), b, progress=False,
          log=lambda *x, **k: None)
    pipeline.evaluate_to_folder(checkpoints.load_checkpoint(a), _small(cifar, 300), a / "eval")
    return a, b


def test_compare_writes_one_table_the_differences_and_the_curves(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "out"
    assert cli.main(["compare", str(a), str(b), "--out", str(out), "--html"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((a / "eval" / "results.json").read_text())
    metas = [json.loads((run / "final" / "meta.json").read_text()) for run in runs]
    recipes = [json.loads((run / "recipe.json").read_text()) for run in runs]
    differing = [k for k in recipes[0] if recipes[0][k] != recipes[1][k]]  # in the recipe's order
    assert differing == ["batch_size", "lr"]

    # the console: the table, the recipe differences, and why the second run has no test numbers
    assert f"{100 * results['accuracy']:.2f}%" in printed
    assert re.search(r"^lr\s+0\.005\s+0\.01\s*$", printed, re.M) and re.search(r"^batch_size\s+32\s+64\s*$",
                                                                               printed, re.M)
    assert f"note: {HOSTILE_NAME}: not evaluated: run cifarlab evaluate {shlex.quote(str(b))}" in printed

    # the CSV: one row per run, numbers unrounded, then exactly the fields that differ
    with open(out / compare.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["lr-5e-3", "'" + HOSTILE_NAME]  # not a formula in a spreadsheet
    assert list(rows[0])[-2:] == differing
    assert [(r["lr"], r["batch_size"]) for r in rows] == [("0.005", "32"), ("0.01", "64")]
    assert float(rows[0]["test_accuracy"]) == pytest.approx(results["accuracy"], abs=1e-6)
    assert float(rows[0]["ci95_low"]) < results["accuracy"] < float(rows[0]["ci95_high"])
    assert rows[0]["test_images"] == "300" and rows[1]["test_accuracy"] == "" and rows[1]["ece"] == ""
    assert float(rows[0]["ece"]) == pytest.approx(results["calibration"]["before"]["ece"], abs=1e-6)
    parameters = build_model("exercise").num_parameters()
    for row, meta in zip(rows, metas):
        assert int(row["parameters"]) == parameters and int(row["epochs"]) == len(meta["history"]) == 2
        assert float(row["train_seconds"]) == pytest.approx(meta["train_seconds"], rel=1e-5)
        assert float(row["last_val_acc"]) == pytest.approx(meta["history"][-1]["val_acc"], abs=1e-6)

    # the curves: a PNG with a line of each run's colour (tab10 blue and orange)
    from PIL import Image

    pixels = np.asarray(Image.open(out / compare.CURVES_FILE).convert("RGB")).astype(int)
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(pixels - color).sum(-1) < 30).sum() > 200, color

    # the HTML: self-contained, every name escaped
    page = (out / compare.HTML_FILE).read_text()
    assert "&lt;b&gt;$x^$" in page and "<b>" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert re.findall(r'<img src="([^"]{30})', page) == ["data:image/png;base64,iVBORw0K"]  # one PNG
    assert "<td>lr</td><td class=\"num\">0.005</td><td class=\"num\">0.01</td>" in page


def test_compare_says_when_test_numbers_are_stale_or_not_comparable(runs, cifar, tmp_path, capsys):
    a, b = (tmp_path / run.name for run in runs)
    for run, copy in zip(runs, (a, b)):
        shutil.copytree(run, copy)
    pipeline.evaluate_to_folder(checkpoints.load_checkpoint(a), _small(cifar, 300), a / "eval")
    pipeline.evaluate_to_folder(checkpoints.load_checkpoint(b), _small(cifar, 200), b / "eval")
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    assert "different test sets" in capsys.readouterr().out
    # results.json for other weights (the run was trained further since): not used, and said why
    results = json.loads((b / "eval" / "results.json").read_text())
    (b / "eval" / "results.json").write_text(json.dumps(dict(results, weights_sha256="0" * 64)))
    run = compare.load_run(b)
    assert run.results is None and "is for other weights of this checkpoint" in run.note


def test_compare_refuses_what_is_not_two_runs(runs, tmp_path, capsys):
    a, _ = runs
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(a, damaged)
    shutil.rmtree(damaged / "checkpoints")
    (damaged / "final" / "model.safetensors").write_bytes(b"not safetensors")
    cases = {
        (str(tmp_path / "missing"),): "compare takes 2 to 50 run folders, not 1",
        (str(a), str(tmp_path / "missing")): f"{tmp_path / 'missing'}: no such folder",
        (str(a), str(tmp_path / "file")): f"{tmp_path / 'file'}: is a file, not a run folder",
        (str(a), str(tmp_path / "empty")): f"{tmp_path / 'empty'}: not a run folder (it has neither final/ nor",
        (str(a), f"{a}/../{a.name}"): "given twice",
        (str(a), str(damaged)): "damaged",
    }
    for args, message in cases.items():
        assert cli.main(["compare", *args, "--out", str(tmp_path / "out")]) == cli.EXIT_ERROR, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the runs are known to be runs
    (tmp_path / "out").write_text("a file")
    assert cli.main(["compare", str(a), str(runs[1]), "--out", str(tmp_path / "out")]) == cli.EXIT_ERROR
    assert "exists and is not a folder" in capsys.readouterr().err
