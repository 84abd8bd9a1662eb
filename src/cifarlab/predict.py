"""``cifarlab predict CHECKPOINT IMAGE...``: the top-k classes of image files, with probabilities.

Each file goes through :func:`cifarlab.images.load_image` (EXIF-upright, RGB on white, center square,
Lanczos to 32x32), then the checkpoint's own normalization, then the model; probabilities are the
softmax of the logits (the exercise's last layer). A file that cannot be read is reported by name and
the others are still predicted; the exit status is then 2.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from .checkpoints import Checkpoint, load_checkpoint
from .errors import ImageError
from .evaluate import checkpoint_tta, predict_logits
from .images import load_image
from .transforms import Normalization

EXIT_ERROR = 2


def predict_images(ckpt: Checkpoint, images: torch.Tensor, top_k: int = 3, tta: int | None = None,
                   device: str | None = None) -> list[list[dict]]:
    """uint8 (N, 3, 32, 32) -> for each image its ``top_k`` {"class", "probability"}, most likely first."""
    classes = ckpt.meta["classes"]
    tta = checkpoint_tta(ckpt.meta, tta)
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    model = ckpt.model.to(device) if device else ckpt.model
    logits = predict_logits(model, images, normalization, device=device, tta=tta)
    probabilities = torch.softmax(logits.double(), dim=1)
    top = torch.topk(probabilities, min(top_k, len(classes)), dim=1)
    return [[{"class": classes[i], "probability": float(p)} for p, i in zip(ps.tolist(), idx.tolist())]
            for ps, idx in zip(top.values, top.indices)]


def predict_files(ckpt: Checkpoint, paths, top_k: int = 3, tta: int | None = None,
                  device: str | None = None) -> list[dict]:
    """One entry per file, in order: {"image", "predictions"} or {"image", "error"} for an unreadable one."""
    entries, good, tensors = [], [], []
    for path in paths:
        try:
            tensors.append(load_image(path))
            good.append(len(entries))
            entries.append({"image": str(path)})
        except ImageError as e:
            entries.append({"image": str(path), "error": str(e)})
    if tensors:
        for i, predictions in zip(good, predict_images(ckpt, torch.stack(tensors), top_k, tta, device)):
            entries[i]["predictions"] = predictions
    return entries


def format_text(entries: list[dict]) -> str:
    lines = []
    for entry in entries:
        if "error" in entry:
            continue  # errors go to stderr
        lines.append(entry["image"])
        width = max(len(p["class"]) for p in entry["predictions"])
        lines += [f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%"
                  for rank, p in enumerate(entry["predictions"], start=1)]
    return "\n".join(lines)


def cmd_predict(args) -> int:
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


def add_cli(sub) -> None:
    from .cli import _bounded_int, add_tta_argument

    p = sub.add_parser("predict", help="top-k classes of image files (any size or format)",
                       description="Predict the class of image files. Each is made upright (EXIF), converted "
                                   "to RGB (transparency on white), center-cropped to a square and resized "
                                   "to 32x32 (Lanczos) before the model sees it.")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, GIF, ...)")
    p.add_argument("--top-k", type=_bounded_int(1, 1000), default=3,
                   help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    p.add_argument("--device", help="cpu, cuda ... (default: cpu)")
    p.set_defaults(func=cmd_predict)
