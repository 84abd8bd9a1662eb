"""One's own photos, as a new user trains them: presets with their budgets, fine-tuning, and how pictures
are fitted to squares.

``--photos FOLDER``: an ImageFolder with train/ and val/ (e.g. ../shared/photos/hymenoptera_data). Each
variant loads it as ``cifarlab train --dataset folder:FOLDER`` does (automatic image size, the chosen
``--fit``), adapts the recipe with the preset's budget exactly as the command line does (only the
overrides count as explicit), trains, and reports the final model's accuracy on val/ (never used to
choose anything). ``finetune`` variants start from a ``fast`` run on the CIFAR-10 training set (trained
once, at the start, with ``--data-dir``).

    python bench/bench_photos.py --photos ../shared/photos/hymenoptera_data --data-dir ../shared/cifar-10-batches-bin
    python bench/bench_photos.py --photos /tmp/odd-cifar --variants crop=fast@crop squish=fast@squish pad=fast@pad

A variant is ``NAME=PRESET[@FIT][:field=value,...]``; ``init_from=cifar`` means the CIFAR-10 source run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_doctor import parse_variant  # noqa: E402
from common import header, table  # noqa: E402

from cifarlab.budget import fit_budget  # noqa: E402
from cifarlab.data import load_cifar10, load_dataset  # noqa: E402
from cifarlab.train import recipe_from, train  # noqa: E402

DEFAULT_VARIANTS = ["fast=fast", "photos=photos", "photos+finetune=photos:init_from=cifar,freeze_epochs=5,lr_mult=100"]


def source_run(data_dir: str, folder: Path, log) -> Path:
    """The fast preset on the CIFAR-10 training set (seed 0): the weights the finetune variants start from."""
    run = folder / "cifar-fast"
    started = time.perf_counter()
    result = train(recipe_from("fast"), load_cifar10(data_dir, download=False), run, progress=False, log=lambda *a: None)
    log(f"source: fast on CIFAR-10, test accuracy {result.history[-1]['val_acc']:.4f}, "
        f"{time.perf_counter() - started:.0f} s")
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", required=True)
    ap.add_argument("--data-dir", help="CIFAR-10 (for the finetune variants' source run)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    header(f"Own photos: {args.photos}", f"final-model accuracy on the folder's test/val split, seeds {args.seeds}, "
                                         f"precision auto, default threads")
    variants = []
    for text in args.variants:
        name, preset, overrides = parse_variant(text.replace("init_from=cifar", "init_from=CIFAR"))
        preset, _, fit = preset.partition("@")
        variants.append((name, preset, fit or None, overrides))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = None
        if any(o.get("init_from") == "CIFAR" for *_, o in variants):
            source = source_run(args.data_dir, Path(tmp), print)
        datasets = {}
        for seed in args.seeds:
            for name, preset, fit, overrides in variants:
                if fit not in datasets:
                    datasets[fit] = load_dataset(f"folder:{args.photos}", progress=False, fit=fit, log=lambda *a: None)
                data = datasets[fit]
                given = dict(overrides, seed=seed)
                if given.get("init_from") == "CIFAR":
                    given["init_from"] = str(source)
                recipe, plan = fit_budget(recipe_from(preset, **given), len(data.train), explicit=set(overrides))
                started = time.perf_counter()
                result = train(recipe, data, Path(tmp) / f"{name}-{seed}", progress=False, log=lambda *a: None,
                               diagnose=False)
                rows.append({"variant": name, "seed": seed, "size": data.image_shape[-1],
                             "fit": data.describe().get("identity", {}).get("fit", "-"), "steps": plan.steps,
                             "batch": recipe.batch_size, "s": round(time.perf_counter() - started, 1),
                             "acc": 100 * result.history[-1]["val_acc"]})
                print(f"{name} seed {seed}: {rows[-1]['acc']:.2f}% ({plan.describe()})", flush=True)
    print()
    print(table([dict(r, acc=f"{r['acc']:.2f}%") for r in rows],
                ["variant", "seed", "size", "fit", "batch", "steps", "s", "acc"]))
    print()
    summary = []
    for name, *_ in variants:
        accs = [r["acc"] for r in rows if r["variant"] == name]
        summary.append({"variant": name, "seeds": len(accs), "mean": f"{statistics.mean(accs):.2f}%",
                        "std": f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "",
                        "min..max": f"{min(accs):.2f}..{max(accs):.2f}"})
    print(table(summary, ["variant", "seeds", "mean", "std", "min..max"]))


if __name__ == "__main__":
    main()
