"""``cifarlab summary``, ``cifarlab models`` and ``cifarlab data``: what is there, without training."""
from __future__ import annotations

from .args import add_data_args, bounded_int, load_data


def register(sub) -> None:
    p = sub.add_parser("summary", help="Keras-style table of a model's layers, shapes and parameters")
    p.add_argument("--model", default="exercise", help="registered name or .json/.toml declaration")
    p.add_argument("--checkpoint", help="summarize the model stored in a checkpoint instead")
    p.add_argument("--classes", type=bounded_int(2, 10_000), default=10,
                   help="number of classes for a registered model's head (default: 10)")
    p.add_argument("--image-size", type=bounded_int(8, 512),
                   help="input image size (default: the declaration's input_shape, 3x32x32 unless it says otherwise)")
    p.set_defaults(func=summary)

    p = sub.add_parser("models", help="list registered models, presets and datasets")
    p.set_defaults(func=models)

    p = sub.add_parser("data", help="find (or download), verify and describe a dataset")
    add_data_args(p)
    p.set_defaults(func=data)


def summary(args) -> int:
    from ..models import get_declaration, summary

    if args.checkpoint:
        from ..checkpoints import load_checkpoint

        print(summary(load_checkpoint(args.checkpoint).model))
    else:
        print(summary(get_declaration(args.model, num_classes=args.classes,
                                      input_shape=_square(args.model, args.image_size, args.classes))))
    return 0


def _square(model: str, size: int | None, classes: int):
    """--image-size as an input shape that keeps the declaration's channels; None keeps its own shape."""
    if size is None:
        return None
    from ..models import get_declaration, input_shape

    return (input_shape(get_declaration(model, num_classes=classes))[0], size, size)


def models(args) -> int:
    from ..data import DATASETS
    from ..models import MODELS, count_parameters
    from ..recipes import PRESETS

    print(f"{'model':<14}{'parameters':>12}  description (10 classes, 32x32)")
    for name, decl in MODELS.items():
        print(f"{name:<14}{count_parameters(decl):>12,}  {decl.get('description', '')}")
    print("\npresets: " + ", ".join(f"{k} (model {v.model}, {v.epochs} epochs)" for k, v in PRESETS.items()))
    print("\ndatasets (--dataset):")
    for entry in DATASETS.values():
        print(f"  {entry.usage:<20}{entry.description}")
    return 0


def data(args) -> int:
    ds = load_data(args)
    verified = ds.identity.get("md5")
    how = ("all files match their official md5" if isinstance(verified, dict) else
           "sizes and labels checked (no official per-file checksums)" if ds.name == "cifar100" else
           f"decoded and cached by content (sha256 {ds.identity.get('content_sha256', '')[:12]}...)"
           if ds.name == "folder" else "not verified")
    print(f"{ds.spec} at {ds.root}: {len(ds.train):,} training and {len(ds.test):,} test images of "
          f"{'x'.join(map(str, ds.image_shape))}, {ds.num_classes} classes; {how}")
    shown = ", ".join(ds.classes[:20]) + (f", ... ({ds.num_classes} in all)" if ds.num_classes > 20 else "")
    print(f"classes: {shown}")
    return 0
