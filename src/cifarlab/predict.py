"""``cifarlab predict CHECKPOINT IMAGE...``: the top-k classes of image files, with probabilities.

Each file goes through :func:`cifarlab.images.load_image` (EXIF-upright, RGB on white, made square the
way the checkpoint's training data was (its dataset identity's ``fit``: crop, squish or pad; ``crop``
for CIFAR runs and runs recorded before fits existed), Lanczos to the checkpoint's image size, 32x32
for CIFAR), then the checkpoint's own normalization, then the model; probabilities are the
softmax of the logits (the exercise's last layer), divided first by the checkpoint's temperature when it
stores one (``cifarlab calibrate``, or training with ``--val-split``): ``softmax(logits / T)``. The
ranking, so the top-1 class, is the same with or without it. A file that cannot be read is reported by name and
the others are still predicted; the exit status is then 2.

Out-of-distribution flag (:mod:`cifarlab.ood`): given the run's detector, each image also gets its KNN score
(the negative distance of its penultimate feature to the k-th nearest training feature; higher = more like
the training images) and the run's threshold; below it, the image is "unlike any class I know", whatever
its top class says. The entry: ``"ood": {"score", "threshold", "flag", "method": "knn", "k"}``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import Checkpoint, load_checkpoint
from .errors import ImageError
from .evaluate import checkpoint_tta, predict_logits
from .images import fit_of, load_image, shown
from .ood import FLAG_SCORE, FLAG_TEXT
from .temperature import checkpoint_temperature
from .temperature import probabilities as temperature_probabilities
from .transforms import Normalization



def predict_images(ckpt: Checkpoint, images: torch.Tensor, top_k: int = 3, tta: int | None = None,
                   device: str | None = None) -> list[list[dict]]:
    """uint8 (N, C, H, W) -> for each image its ``top_k`` {"class", "probability"}, most likely first."""
    classes = ckpt.meta["classes"]
    tta = checkpoint_tta(ckpt.meta, tta)
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    model = ckpt.model.to(device) if device else ckpt.model
    logits = predict_logits(model, images, normalization, device=device, tta=tta)
    probabilities = temperature_probabilities(logits, checkpoint_temperature(ckpt.meta))
    top = torch.topk(probabilities, min(top_k, len(classes)), dim=1)
    return [[{"class": classes[i], "probability": float(p)} for p, i in zip(ps.tolist(), idx.tolist())]
            for ps, idx in zip(top.values, top.indices)]


def predict_files(ckpt: Checkpoint, paths, top_k: int = 3, tta: int | None = None,
                  device: str | None = None, fit: str | None = None, ood=None, explain_dir=None,
                  methods=None, neighbours: int = 5) -> list[dict]:
    """One entry per file, in order: {"image", "predictions"} or {"image", "error"} for an unreadable one.
    ``fit``: how pictures are made square; None (the right choice): as the checkpoint's training data was.
    ``ood``: an :class:`cifarlab.ood.OODDetector`, or a function of no arguments returning one (or None),
    called only when at least one file was read; each read file's entry then gets "ood".
    ``explain_dir``: also explain each read photo (:mod:`cifarlab.explain.photo`: ``methods``, default
    Integrated Gradients and Grad-CAM; ``neighbours`` nearest training images) into that folder; its entry
    gets "explanation" ({"png", "html", "neighbours", ...})."""
    entries, good, images = read_files(ckpt, paths, fit)
    if images is None:
        return entries
    predictions = predict_images(ckpt, images, top_k, tta, device)
    for i, p in zip(good, predictions):
        entries[i]["predictions"] = p
    detector = ood() if callable(ood) else ood
    if detector is not None:
        for i, score in zip(good, detector.score(images)[FLAG_SCORE]):
            entries[i]["ood"] = detector.entry(float(score))
    if explain_dir is not None:
        _explain(ckpt, entries, good, images, predictions, detector, explain_dir, methods, neighbours)
    return entries


def read_files(ckpt: Checkpoint, paths, fit: str | None = None) -> tuple[list[dict], list[int], torch.Tensor | None]:
    """(an entry per file, the positions of the files read, their uint8 images or None), each file read the
    checkpoint's way (its image size, its training data's fit)."""
    from .models import input_shape

    size = input_shape(ckpt.meta["architecture"])[-1]
    fit = fit or fit_of(ckpt.meta.get("dataset"))
    entries, good, tensors = [], [], []
    for path in paths:  # names shown printably: a file name that is not UTF-8 must not break the output
        try:
            tensors.append(load_image(path, size, fit=fit))
            good.append(len(entries))
            entries.append({"image": shown(path)})
        except ImageError as e:
            entries.append({"image": shown(path), "error": str(e)})
    return entries, good, (torch.stack(tensors) if tensors else None)


def _explain(ckpt, entries, good, images, predictions, detector, out_dir, methods, neighbours) -> None:
    from .explain import PHOTO_METHODS
    from .explain.photo import explain_photos, write_all

    model_device = next(ckpt.model.parameters()).device
    found = explain_photos(ckpt, images.to(model_device), [entries[i]["image"] for i in good], predictions, detector,
                           methods or PHOTO_METHODS, neighbours, [entries[i].get("ood") for i in good])
    for i, e, files in zip(good, found, write_all(found, out_dir, checkpoint_temperature(ckpt.meta))):
        entries[i]["explanation"] = dict(files, **{k: v for k, v in e.to_dict().items()
                                                   if k in ("methods", "gradcam_layer", "neighbours",
                                                            "neighbours_agreeing", "notes")})


def format_text(entries: list[dict]) -> str:
    lines = []
    for entry in entries:
        if "error" in entry:
            continue  # errors go to stderr
        lines.append(entry["image"])
        width = max(len(p["class"]) for p in entry["predictions"])
        lines += [f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%"
                  for rank, p in enumerate(entry["predictions"], start=1)]
        ood = entry.get("ood")
        if ood and ood["flag"]:
            lines.append(f"  ! {FLAG_TEXT} (score {ood['score']:.4f}, threshold {ood['threshold']:.4f})")
        explained = entry.get("explanation")
        if explained:
            if explained["neighbours"]:
                lines.append(f"  nearest training images: {explained['neighbours_agreeing']} of "
                             f"{len(explained['neighbours'])} are {entry['predictions'][0]['class']}")
            lines.append(f"  why: {explained['png']}")
    return "\n".join(lines)
