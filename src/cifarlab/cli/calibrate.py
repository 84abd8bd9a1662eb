"""``cifarlab calibrate RUN``: fit the temperature of a finished run on its held-out training images."""
from __future__ import annotations

import json

from .args import add_data_args, add_tta_argument, load_data


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a temperature on the run's held-out training images (temperature "
                                         "scaling) and store it in its final checkpoint",
                       description="Temperature scaling for a run trained with --val-split N: the N held-out "
                                   "training images are rebuilt from the stored recipe (val_split, seed), one "
                                   "temperature T minimizing their NLL is fitted, and the final checkpoint is "
                                   "re-saved (atomically) with it. predict, export and evaluate then use "
                                   "softmax(logits / T); the test set is never used for fitting.")
    p.add_argument("run", metavar="RUN", help="a finished run folder (or its final/ checkpoint folder)")
    p.add_argument("--json", action="store_true", help="print the calibration entry as JSON")
    p.add_argument("--device")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    add_data_args(p, default_help="the data the checkpoint was trained on")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import load_checkpoint
    from ..temperature import calibrate_checkpoint

    ckpt = load_checkpoint(args.run)
    data = load_data(args, stored=ckpt.meta.get("dataset"), log=lambda *a, **k: None if args.json else print(*a),
                     refuse_changes=True)  # the temperature is stored in the run: fitted on the run's own data
    from ..rundir import RunLock

    with RunLock(ckpt.path.parent):  # never while a training or another command writes this run
        ckpt = load_checkpoint(args.run)  # as it is now, under the lock
        entry = calibrate_checkpoint(ckpt, data, device=args.device, tta=args.tta)
    if args.json:
        print(json.dumps(dict(entry, checkpoint=str(ckpt.path)), indent=2))
    else:
        print(f"temperature {entry['temperature']:.4f} fitted on {entry['fitted_on']}"
              f"{' (at a bound)' if entry['at_bound'] else ''}: ECE {100 * entry['ece_before']:.2f}% -> "
              f"{100 * entry['ece_after']:.2f}%, NLL {entry['nll_before']:.4f} -> {entry['nll_after']:.4f}, "
              f"Brier {entry['brier_before']:.4f} -> {entry['brier_after']:.4f} (on those images)")
        print(f"stored in {ckpt.path}; re-run cifarlab evaluate for the test-set numbers")
    return 0
