"""``cifarlab lr-find``: the learning-rate range test (fastai's) for a recipe, a model and a dataset."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .args import add_data_args, add_preset_and_recipe_args, bounded_float, bounded_int, load_data, recipe_from_args


def register(sub) -> None:
    p = sub.add_parser("lr-find", help="learning-rate range test: a loss-vs-lr plot and a suggested lr",
                       description="Trains the recipe's model with its own optimizer for --steps steps while the "
                                   "learning rate grows exponentially from --start-lr to --end-lr, stops when the "
                                   "smoothed loss passes 4x its best, puts the weights back, and writes "
                                   "lr_find.png and lr_find.json. Suggested lr: the lr at the smoothed loss's "
                                   "minimum / 10 (the steepest descent is shown too).")
    add_preset_and_recipe_args(p, "recipe (defaults come from --preset; --lr is ignored: the test sweeps it)")
    t = p.add_argument_group("range test")
    t.add_argument("--steps", type=bounded_int(3, 100_000),
                   help="at most this many steps (default: 12,800 images' worth, at least 100: 400 at batch 32)")
    t.add_argument("--start-lr", type=bounded_float(1e-12, 100.0), default=1e-7, help="default: 1e-7")
    t.add_argument("--end-lr", type=bounded_float(1e-12, 1000.0), default=10.0, help="default: 10")
    t.add_argument("--out", help="folder for lr_find.png and lr_find.json (default: RUNS_DIR/lr-find-PRESET-TIME)")
    t.add_argument("--runs-dir", default="runs")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    from ..precision import PRECISIONS

    t.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for train (default: auto)")
    t.add_argument("--threads", type=bounded_int(1, 1024), help="CPU threads (default: all cores)")
    t.add_argument("--no-progress", action="store_true", help="no download progress bar")
    add_data_args(p)
    p.set_defaults(func=lr_find_command)


def lr_find_command(args) -> int:
    import torch

    from .. import lr_find as finder
    from ..data.base import user_path

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.start_lr >= args.end_lr:
        raise ValueError(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
    recipe = recipe_from_args(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = finder.check_out_folder(user_path(args.out, "--out=") if args.out else
                                  Path(args.runs_dir) / f"lr-find-{args.preset}-{stamp}")
    data = load_data(args)
    result = finder.lr_find(recipe, data, device=args.device, start_lr=args.start_lr, end_lr=args.end_lr,
                            steps=args.steps, precision=args.precision)
    files = finder.save(result, out)
    print(json.dumps({"suggested_lr": result.suggestion, "rule": result.rule, "min_loss_lr": result.min_loss_lr,
                      "steepest_lr": result.steepest_lr, "steps_run": len(result.lrs),
                      "stopped_early": result.stopped_early}, indent=1))
    print(f"plot: {files['png']}\nnumbers: {files['json']}")
    print(f"train with it: cifarlab train --preset {args.preset} --lr {result.suggestion:.3g} ...")
    return 0
