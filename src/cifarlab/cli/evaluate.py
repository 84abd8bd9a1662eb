"""``cifarlab evaluate``: test accuracy, per-class accuracy, confusion matrix, galleries of a checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import add_data_args, add_tta_argument, bounded_float, bounded_int, load_data


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix, galleries")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--model", help="fail unless the checkpoint holds this architecture")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    p.add_argument("--tta-below", type=bounded_float(0.0, 1.0), metavar="P",
                   help="selective TTA: augment only the images whose top class probability is below P "
                        "(one plain pass for all; faster, accuracy measured in the README)")
    p.add_argument("--seed", type=bounded_int(0, 2 ** 32 - 1), default=0, help="for the random gallery")
    p.add_argument("--device")
    p.add_argument("--on", action="append", default=[], metavar="SPEC",
                   help="also evaluate on this test set of the same classes and report the accuracy gap with 95%% "
                        "intervals (e.g. cifar10.1); repeatable")
    p.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    add_data_args(p, default_help="the data the checkpoint was trained on")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import pipeline
    from ..checkpoints import load_checkpoint
    from ..data import load_dataset, parse_spec, stored_options

    if args.device:
        from ..devices import resolve_device

        resolve_device(args.device)  # before anything is loaded or any folder made
    ckpt = load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    data = load_data(args, stored=ckpt.meta.get("dataset"), log=lambda *a, **k: None if args.json else print(*a))
    if args.model:
        pipeline.check_compatible(ckpt, data, args.model)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "eval"
    # A shifted folder is fitted to the size and in the way the model was trained on.
    fitted = {k: v for k, v in stored_options(ckpt.meta.get("dataset") or {}).items() if k in ("image_size", "fit")}
    shifted = [load_dataset(spec, download=not args.no_download, progress=not args.json,
                            **(fitted if parse_spec(spec)[0] == "folder" else {})) for spec in args.on]
    ev, files = pipeline.evaluate_to_folder(ckpt, data, out, seed=args.seed, tta=args.tta, device=args.device,
                                            shifted=shifted, tta_below=args.tta_below)
    results = json.loads(Path(files["results"]).read_text())
    if args.json:
        print(json.dumps(dict(results, files=files), indent=2))
    else:
        print(pipeline.results_summary(results))
        print(f"written to {out}/: " + ", ".join(Path(f).name for f in files.values()))
    return 0
