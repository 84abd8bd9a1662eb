"""The training doctor's options side by side: EMA, MixUp, CutMix (and early stopping) against the plain recipe.

Each variant is a preset plus recipe overrides (``NAME=preset[:field=value,...]``). For every seed, every
variant trains on all 50,000 training images in turn (interleaved, so a slower stretch of the machine
hits all variants alike), validating on the test set as the exercise does; the table reports the final
model's CIFAR-10 test accuracy (the EMA's weights when EMA is on; the recipe's TTA level), training
seconds (evaluation excluded), and per variant the mean +- std over seeds and the mean paired difference
against the first variant of the same preset (same seed, same data order and initial weights).

    python bench/bench_doctor.py --data-dir ../shared/cifar-10-batches-bin --seeds 0
    python bench/bench_doctor.py --data-dir ... --variants fast fast+ema=fast:ema=0.99 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

from cifarlab.data import load_cifar10  # noqa: E402
from cifarlab.recipes import Recipe  # noqa: E402
from cifarlab.train import recipe_from, resolve_precision, train  # noqa: E402

DEFAULT_VARIANTS = ["exercise", "exercise+ema=exercise:ema=0.999", "exercise+mixup=exercise:mixup=0.2",
                    "exercise+cutmix=exercise:cutmix=1.0"]


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``name=preset:field=value,field=value`` (or just a preset name) -> (name, preset, overrides)."""
    name, _, spec = text.partition("=") if "=" in text.split(":")[0] else (text, "", text)
    preset, _, rest = spec.partition(":")
    types = {f.name: f.type for f in fields(Recipe)}
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = {"int": int, "float": float, "bool": lambda v: v == "true", "str": str}[types[key]](value)
    return name, preset, overrides


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()
    import torch

    data = load_cifar10(args.data_dir, download=False)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    variants = [parse_variant(v) for v in args.variants]
    header("Training doctor: EMA / MixUp / CutMix against the plain recipe",
           f"final-model CIFAR-10 test accuracy and training seconds, {precision}, seeds {args.seeds}, "
           f"{torch.get_num_threads()} fixed threads")
    rows = []
    for seed in args.seeds:
        for name, preset, overrides in variants:
            recipe = recipe_from(preset, seed=seed, **overrides)
            with tempfile.TemporaryDirectory() as tmp:
                result = train(recipe, data, Path(tmp) / "run", progress=False, log=lambda *a: None,
                               precision=precision, diagnose=False)
            last = result.history[-1]
            rows.append({"variant": name, "preset": preset, "seed": seed, "epochs": len(result.history),
                         "train s": round(sum(h["seconds"] for h in result.history), 1),
                         "test acc": 100 * last["val_acc"], "best epoch acc": 100 * max(h["val_acc"]
                                                                                     for h in result.history)})
            print(f"{name} seed {seed}: " + ", ".join(f"{h['val_acc']:.4f}" for h in result.history), flush=True)
    print()
    print(table([dict(r, **{"test acc": f"{r['test acc']:.2f}%", "best epoch acc": f"{r['best epoch acc']:.2f}%"})
                 for r in rows], ["variant", "seed", "epochs", "train s", "test acc", "best epoch acc"]))
    print()
    print(table(summary(rows, variants), ["variant", "seeds", "test acc mean", "std", "vs plain (paired)",
                                          "train s mean"]))


def summary(rows: list[dict], variants) -> list[dict]:
    out, plain = [], {}
    for name, preset, _ in variants:
        plain.setdefault(preset, name)
        mine = [r for r in rows if r["variant"] == name]
        accs = [r["test acc"] for r in mine]
        base = {r["seed"]: r["test acc"] for r in rows if r["variant"] == plain[preset]}
        diffs = [r["test acc"] - base[r["seed"]] for r in mine if r["seed"] in base]
        out.append({"variant": name, "seeds": len(mine), "test acc mean": f"{statistics.mean(accs):.2f}%",
                    "std": f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "",
                    "vs plain (paired)": "" if name == plain[preset] else f"{statistics.mean(diffs):+.2f} points",
                    "train s mean": round(statistics.mean(r["train s"] for r in mine), 1)})
    return out


if __name__ == "__main__":
    main()
