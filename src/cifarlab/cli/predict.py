"""``cifarlab predict CHECKPOINT IMAGE...``: the top-k classes of image files (any size or format)."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .args import EXIT_ERROR, add_tta_argument, bounded_int
from .visualize import attribution_methods


def register(sub) -> None:
    from ..explain.methods import METHODS

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
    p.add_argument("--no-ood", action="store_true",
                   help="skip the out-of-distribution flag (by default each image gets its KNN score against the "
                        "run's training features and is flagged 'unlike any class I know' below the run's "
                        "threshold; needs the run folder and its dataset)")
    p.add_argument("--run", type=Path, metavar="RUN",
                   help="the run folder whose feature bank (RUN/ood/) to use when the checkpoint is not inside one")
    g = p.add_argument_group("why this answer (--explain)")
    g.add_argument("--explain", action="store_true",
                   help="also write, per photo, a PNG and an HTML fragment: the photo as the net sees it, the "
                        "calibrated top classes, the out-of-distribution verdict, attribution maps for the top "
                        "class and the nearest training images with their labels")
    g.add_argument("--explain-dir", type=Path, default=Path("explanations"), metavar="DIR",
                   help="where --explain writes NNN-name.png/.html (made if missing; default: ./explanations)")
    g.add_argument("--methods", type=attribution_methods, default=None, metavar="M1,M2",
                   help="attribution methods for --explain, comma-separated, from: " + ", ".join(METHODS)
                        + " (default: integrated_gradients,grad_cam)")
    g.add_argument("--neighbours", type=bounded_int(1, 50), default=5,
                   help="how many nearest training images --explain shows (default: 5)")
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
    explain = {"explain_dir": args.explain_dir, "methods": args.methods, "neighbours": args.neighbours} \
        if args.explain else {}
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        entries = predict_files(ckpt, args.images, args.top_k, args.tta, args.device,
                                ood=None if args.no_ood else lambda: _ood_detector(args, ckpt), **explain)
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


def _ood_detector(args, ckpt):
    """The run's OOD detector (its feature bank built once, then cached in RUN/ood/), or None after one note
    on stderr saying why the flag is unavailable; predictions go on either way."""
    from .. import ood
    from ..data import load_stored
    from ..errors import CifarlabError

    def unavailable(why: str):
        print(f"note: the out-of-distribution flag is unavailable: {why}", file=sys.stderr)
        return None

    if args.run is not None and not args.run.is_dir():
        return unavailable(f"--run {args.run} is not a folder")
    run_dir = args.run or ood.run_dir_of(args.checkpoint) or ood.run_dir_of(ckpt.path)
    if run_dir is None:
        return unavailable("the checkpoint is not inside a run folder (pass --run RUN)")
    entry = ckpt.meta.get("dataset")
    if not isinstance(entry, dict):
        return unavailable("the checkpoint does not record which data it was trained on")
    log = lambda *a, **k: print(*a, file=sys.stderr)  # noqa: E731
    try:
        with contextlib.redirect_stdout(sys.stderr):  # loaders' messages: stdout stays clean for --json
            data = load_stored(entry, log=log)
            return ood.prepare(ckpt, data, run_dir=run_dir, device=args.device, log=log)
    except (CifarlabError, OSError) as e:
        return unavailable(f"{e} (the run's training data is needed; --no-ood skips this)")
