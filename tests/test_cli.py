"""The command line, end to end in real processes: summary, run (train, evaluate, report), evaluate --json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.models import get_declaration


def cifarlab(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cifarlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_summary_shows_the_exercise_parameter_count(capsys):
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 1,084,234" in out and "fc1 (dense)" in out


def test_summary_of_a_user_declaration(capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.json"
    assert main(["summary", "--model", str(example)]) == 0
    assert 'Model: "small_cnn"' in capsys.readouterr().out


def test_bad_declaration_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [{"type": "conv", "filters": 8}, {"type": "dense", "units": 10}]}))
    assert main(["summary", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs a flat input" in err and "Traceback" not in err


@pytest.mark.parametrize("shape", [[3, -1, 5], [3, 32], ["a", 32, 32], [7, 32, 32]])
def test_summary_refuses_a_broken_input_shape_even_with_image_size(tmp_path, capsys, shape):
    """Before: summary replaced the declaration's input_shape by --image-size's default, so a broken one
    passed (and a 1x28x28 net was summarized as 3x32x32)."""
    decl = get_declaration("exercise")
    decl["input_shape"] = shape
    path = tmp_path / "d.json"
    path.write_text(json.dumps(decl))
    for extra in ([], ["--image-size", "64"]):
        assert main(["summary", "--model", str(path), *extra]) == 2
        assert capsys.readouterr().err == f"error: {path}: 'input_shape' must be [channels 1..4, height, width " \
                                          f"1..1024], not {shape!r}\n"


def test_summary_keeps_the_declarations_own_shape_and_channels(tmp_path, capsys):
    decl = get_declaration("exercise")
    decl["input_shape"] = [1, 28, 28]
    path = tmp_path / "gray.json"
    path.write_text(json.dumps(decl))
    assert main(["summary", "--model", str(path)]) == 0
    assert "(input 1x28x28;" in capsys.readouterr().out
    assert main(["summary", "--model", str(path), "--image-size", "64"]) == 0
    assert "(input 1x64x64;" in capsys.readouterr().out


def test_run_end_to_end_then_evaluate_json(data_dir, tmp_path):
    """The main job on a small slice of real data: every artifact lands in the run folder."""
    runs = tmp_path / "runs"
    proc = cifarlab("run", "--epochs", "1", "--train-subset", "2000", "--name", "smoke", "--runs-dir", runs,
                    "--data-dir", data_dir, "--no-progress", "--faithfulness-images", "20", "--sanity-images", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs / "smoke"
    for name in ["metrics.csv", "recipe.json", "training_curves.png", "final/model.safetensors", "final/meta.json",
                 "eval/results.json", "eval/confusion_matrix.png", "eval/confusion_matrix.json",
                 "eval/per_class_accuracy.png", "eval/gallery.png", "eval/worst_mistakes.png", "eval/reliability.png",
                 "visualize/attribution_methods.png", "visualize/faithfulness.png", "visualize/sanity.png",
                 "visualize/examples_classes.png", "visualize/explanations.json", "report.html"]:
        assert (run / name).is_file(), name
    assert "Test accuracy:" in proc.stdout and str(run) in proc.stdout
    assert "validation: test set (as in the exercise)" in proc.stdout

    again = cifarlab("run", "--epochs", "1", "--name", "smoke", "--runs-dir", runs, "--data-dir", data_dir)
    assert again.returncode == 2 and "is not empty (it holds " in again.stderr

    ev = cifarlab("evaluate", run, "--json", "--data-dir", data_dir, "--out", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr[-3000:]
    results = json.loads(ev.stdout)
    stored = json.loads((run / "eval" / "results.json").read_text())
    assert results["accuracy"] == stored["accuracy"] > 0.2
    assert sum(map(sum, results["confusion_matrix"])) == 10_000
    assert set(results["per_class_accuracy"]) == set(results["classes"])
    assert len(results["worst_mistakes"]) == 16

    wrong = cifarlab("evaluate", run, "--model", "fast", "--data-dir", data_dir)
    assert wrong.returncode == 2 and "not the 'fast' asked for" in wrong.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--epochs", "-1"], "-1 is outside 1..10000"),
    (["train", "--batch-size", str(10 ** 12)], "is outside 1..65536"),
    (["train", "--lr", "nan"], "nan is outside"),
    (["train", "--preset", "turbo"], "invalid choice"),
])
def test_hostile_arguments_are_rejected_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tta_option_takes_a_level():
    from cifarlab.cli import build_parser

    parser = build_parser()
    base = ["train", "--preset", "fast"]
    assert parser.parse_args(base).tta is None
    assert parser.parse_args(base + ["--tta"]).tta == 1
    assert parser.parse_args(base + ["--tta-level", "2"]).tta == 2
    assert parser.parse_args(base + ["--no-tta"]).tta == 0
    assert parser.parse_args(["evaluate", "runs/x", "--tta-level", "2"]).tta == 2
    # A bare --tta before a positional argument must not take it as a value.
    args = parser.parse_args(["evaluate", "--tta", "runs/x"])
    assert (args.tta, args.checkpoint) == (1, "runs/x")
    args = parser.parse_args(["predict", "run/final", "--tta", "a.png"])
    assert (args.tta, [str(i) for i in args.images]) == (1, ["a.png"])
