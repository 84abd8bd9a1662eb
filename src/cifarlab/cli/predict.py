"""``cifarlab predict CHECKPOINT IMAGE...``: the top-k classes of image files (any size or format)."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .args import EXIT_ERROR, add_tta_argument, bounded_int


def register(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files (any size or format)",
                       description="Predict the class of image files. Each is made upright (EXIF), converted "
                                   "to RGB (transparency on white), made square the way the checkpoint's "
                                   "training pictures were (center crop, squish or reflect-pad: the run's "
                                   "--fit; crop for CIFAR and older runs) and resized to the checkpoint's "
                                   "image size (Lanczos) before the model sees it.")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, GIF, ...)")
    p.add_argument("--top-k", type=bounded_int(1, 1000), default=3,
                   help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    p.add_argument("--device", help="cpu, cuda ... (default: cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import load_checkpoint
    from ..predict import format_text, predict_files

    if args.device:
        from ..devices import resolve_device

        resolve_device(args.device)
    # Loading may print warnings about skipped damaged checkpoints; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        ckpt = load_checkpoint(args.checkpoint)
    entries = predict_files(ckpt, args.images, args.top_k, args.tta, args.device)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt.path), "architecture": ckpt.meta["architecture"]["name"],
                          "results": entries}, indent=2))
    else:
        text = format_text(entries)
        if text:
            print(text)
    for entry in entries:
        if "error" in entry:
            print(f"error: {entry['error']}", file=sys.stderr)
    return EXIT_ERROR if any("error" in e for e in entries) else 0
