"""Selective test-time augmentation (the 2025 CIFAR-10 speedrun's idea): accuracy and seconds.

For a trained checkpoint, evaluates the test set with the checkpoint's TTA level on every image, without
TTA, and with TTA only for the images whose plain-pass top probability is below a threshold; the
thresholds are chosen as quantiles of that probability over the test set, so the rows show what
augmenting the least confident 10%, 20%, 30%, 50% of the images costs and buys.

    python bench/bench_selective_tta.py RUN_OR_CHECKPOINT [--data-dir DIR] [--tta-level 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

from cifarlab.checkpoints import load_checkpoint  # noqa: E402
from cifarlab.data import load_dataset  # noqa: E402
from cifarlab.evaluate import TTA_LEVELS, checkpoint_tta, predict_logits  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir")
    ap.add_argument("--tta-level", type=int)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt.meta.get("dataset", {}).get("spec") or "cifar10"
    data = load_dataset(spec, data_dir=args.data_dir, download=False)
    norm = Normalization.from_dict(ckpt.meta["normalization"])
    level = checkpoint_tta(ckpt.meta, args.tta_level)
    images, labels = data.test.images, data.test.labels
    header(f"Selective TTA, {ckpt.meta['architecture']['name']} ({args.checkpoint}), {TTA_LEVELS[level]}",
           f"test accuracy and seconds for {len(images):,} test images (fp32 eval, batch 128); threshold = "
           "quantile of the plain pass's top softmax probability")

    def timed(**kw):
        start = time.perf_counter()
        logits = predict_logits(ckpt.model, images, norm, **kw)
        return logits, time.perf_counter() - start

    predict_logits(ckpt.model, images[:256], norm, tta=level)  # warm-up
    plain, plain_s = timed(tta=0)
    full, full_s = timed(tta=level)
    confidence = torch.softmax(plain, 1).amax(1)
    rows = [{"TTA on": "none", "threshold": "", "accuracy": (plain.argmax(1) == labels).float().mean().item(),
             "seconds": plain_s},
            {"TTA on": "every image", "threshold": "", "accuracy": (full.argmax(1) == labels).float().mean().item(),
             "seconds": full_s}]
    for fraction in args.fractions:
        threshold = float(torch.quantile(confidence, fraction))
        logits, seconds = timed(tta=level, tta_below=threshold)
        rows.append({"TTA on": f"least confident {(confidence < threshold).float().mean().item():.0%}",
                     "threshold": f"{threshold:.3f}", "accuracy": (logits.argmax(1) == labels).float().mean().item(),
                     "seconds": seconds})
    for r in rows:
        r["accuracy"] = f"{100 * r['accuracy']:.2f}%"
        r["vs every image"] = f"{r['seconds'] / full_s:.2f}x time"
    print(table(rows, ["TTA on", "threshold", "accuracy", "seconds", "vs every image"]))


if __name__ == "__main__":
    main()
