"""Time to accuracy for cifarlab's presets: full training runs on the real data, several seeds.

For each seed, trains the preset on all 50,000 training images (validation on the test set, as the
exercise did, so the table shows test accuracy after every epoch), and reports training seconds
(evaluation excluded), the final test accuracy, and the seconds until the test accuracy first reached
each target. Mean +- std over seeds at the end.

    python bench/bench_presets.py --data-dir ../shared/cifar-10-batches-bin --preset fast --seeds 0 1 2
    python bench/bench_presets.py ... --preset fast --epochs 20 --targets 0.9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

from cifarlab.data import load_cifar10  # noqa: E402
from cifarlab.evaluate import TTA_LEVELS  # noqa: E402
from cifarlab.train import recipe_from, resolve_precision, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.784, 0.9])
    ap.add_argument("--device")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = ap.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    recipe = recipe_from(args.preset, epochs=args.epochs)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(args.precision, device)
    header(f"Time to accuracy, preset {args.preset!r} ({recipe.epochs} epochs, batch {recipe.batch_size}, "
           f"{precision} on {device})",
           "training seconds (per-epoch evaluation excluded) and CIFAR-10 test accuracy "
           f"(last epoch: {TTA_LEVELS[recipe.tta]}; earlier epochs at most flip TTA), seeds {args.seeds}")
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(recipe_from(args.preset, epochs=args.epochs, seed=seed), data, Path(tmp) / "run",
                           device=device, progress=False, log=lambda *a: None, precision=precision)
        seconds = 0.0
        row = {"seed": seed}
        for h in result.history:
            seconds += h["seconds"]
            for t in args.targets:
                if h["val_acc"] >= t and f"s to {t:.1%}" not in row:
                    row[f"s to {t:.1%}"] = round(seconds, 1)
        row.update({"train s": round(seconds, 1), "test acc": f"{result.history[-1]['val_acc']:.2%}",
                    "img/s": round(statistics.median(h["images_per_s"] for h in result.history))})
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{h['val_acc']:.4f}" for h in result.history), flush=True)
    accs = [float(r["test acc"].rstrip("%")) for r in rows]
    secs = [r["train s"] for r in rows]
    print()
    print(table(rows, ["seed", "train s", "img/s", "test acc"] + [f"s to {t:.1%}" for t in args.targets]))
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\ntest accuracy {statistics.mean(accs):.2f}% +- {spread:.2f} (mean +- std over {len(accs)} seeds); "
          f"training {statistics.mean(secs):.1f} s mean")


if __name__ == "__main__":
    main()
