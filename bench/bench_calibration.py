"""Calibration of trained runs: ECE (15 bins), NLL and Brier on the test set, before and after temperature
scaling, with the temperature fitted on the run's own held-out training images (``--val-split``), never on
the test set. Writes a reliability diagram (before | after) per run.

    python bench/bench_calibration.py --data-dir ../shared/cifar-10-batches-bin runs/ex-val runs/ab94-val
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, table  # noqa: E402

from cifarlab.calibration import calibration_metrics, fit_temperature, reliability_bins, reliability_diagram  # noqa: E402,E501
from cifarlab.checkpoints import load_checkpoint  # noqa: E402
from cifarlab.data import holdout_split, load_cifar10  # noqa: E402
from cifarlab.evaluate import checkpoint_tta, predict_logits  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    header("Calibration before/after temperature scaling", "ECE (15 equal-width bins), NLL, Brier (sum over "
           "classes) on the 10,000 CIFAR-10 test images; T fitted on the run's held-out training images; fp32")
    data = load_cifar10(args.data_dir, download=False)
    rows = []
    for run in args.runs:
        ckpt = load_checkpoint(run / "final")
        recipe = ckpt.meta["recipe"]
        if not recipe.get("val_split"):
            print(f"{run}: no held-out training images (trained without --val-split); skipped")
            continue
        norm = Normalization.from_dict(ckpt.meta["normalization"])
        tta = checkpoint_tta(ckpt.meta, None)
        _, held_out = holdout_split(data.train, recipe["val_split"], seed=recipe["seed"])  # as train.py does
        fit = fit_temperature(predict_logits(ckpt.model, held_out.images, norm, tta=tta), held_out.labels)
        test_logits = predict_logits(ckpt.model, data.test.images, norm, tta=tta)
        before = calibration_metrics(test_logits, data.test.labels)
        after = calibration_metrics(test_logits, data.test.labels, temperature=fit.temperature)
        reliability_diagram([reliability_bins(test_logits, data.test.labels),
                             reliability_bins(test_logits, data.test.labels, temperature=fit.temperature)],
                            args.out / f"reliability_{run.name}.png",
                            titles=[f"{run.name}: before (T = 1)", f"after (T = {fit.temperature:.3f})"])
        for when, m in (("before", before), (f"after T={fit.temperature:.3f}", after)):
            rows.append({"run": run.name, "model": ckpt.meta["architecture"]["name"], "when": when,
                         "accuracy %": 100 * m["accuracy"], "ECE %": 100 * m["ece"], "MCE %": 100 * m["mce"],
                         "NLL": m["nll"], "Brier": m["brier"]})
        print(f"{run}: T = {fit.temperature:.4f} fitted on {len(held_out):,} held-out training images "
              f"(held-out NLL {fit.before['nll']:.4f} -> {fit.after['nll']:.4f}); TTA level {tta}")
    print()
    print(table(rows, ["run", "model", "when", "accuracy %", "ECE %", "MCE %", "NLL", "Brier"]))


if __name__ == "__main__":
    main()
