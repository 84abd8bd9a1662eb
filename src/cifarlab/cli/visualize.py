"""``cifarlab visualize``: maximum stimuli, filters, activation maps, saliency and Grad-CAM into PNGs, and
the explanations of :mod:`cifarlab.explain` (every attribution method, faithfulness, sanity check,
dataset examples)."""
from __future__ import annotations

from pathlib import Path

from .args import add_data_args, bounded_int, load_data


def register(sub) -> None:
    from ..visualize import DEFAULT_IMAGES, METHODS

    p = sub.add_parser("visualize", help="maximum stimuli, filters, activation maps, saliency and Grad-CAM",
                       description="Render what a trained net learned into PNGs (and summary.json).")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder, a checkpoint folder or a "
                                                                  ".safetensors file")
    p.add_argument("--method", choices=METHODS, default="default",
                   help="default: robust, decorrelated, regularized; exercise: the exercise's plain ascent")
    p.add_argument("--seed", type=bounded_int(0, 2 ** 63 - 1), default=0)
    p.add_argument("--steps", type=bounded_int(0, 100_000), help="gradient steps per layer (default: 96 for "
                                                                 "default, 20 for exercise)")
    p.add_argument("--fft", action="store_true", help="default method: Fourier parameterization with a 1/f "
                                                       "spectrum (smoother, more natural-looking stimuli)")
    p.add_argument("--threads", type=bounded_int(0, 1024), default=1,
                   help="CPU threads for the gradient ascent (default 1: its batches are small; 0: torch's "
                        "default)")
    p.add_argument("--layer", metavar="NAME", help="the layer Grad-CAM explains, by its declared name (dotted "
                                                  "inside a residual block, e.g. layer4_2.conv2; default: the "
                                                  "last conv layer or block, after its activation)")
    p.add_argument("--max-channels", type=bounded_int(1, 1 << 16), metavar="N",
                   help="maximum stimuli for at most the first N channels of each layer (default: all; wide "
                        "nets such as resnet18 have 64-512 per block)")
    p.add_argument("--out", help="output folder (default: <run or checkpoint folder>/visualize)")
    p.add_argument("--images", type=bounded_int(0, 10 ** 9), nargs="+", metavar="IDX",
                   help=f"test-set images for activation maps, saliency and Grad-CAM (default: "
                        f"{' '.join(map(str, DEFAULT_IMAGES))})")
    add_explain_args(p)
    add_data_args(p, default_help="the data the checkpoint was trained on")
    p.set_defaults(func=run)


def add_explain_args(p) -> None:
    from .. import explain

    g = p.add_argument_group("explanations (attribution methods, faithfulness, sanity check, dataset examples)")
    g.add_argument("--faithfulness-images", type=bounded_int(0, 10 ** 7), default=explain.FAITHFULNESS_IMAGES,
                   metavar="N", help="test images for the deletion/insertion curves of every method (default: "
                                     f"{explain.FAITHFULNESS_IMAGES}; 0: skip)")
    g.add_argument("--faithfulness-steps", type=bounded_int(2, 1024), default=explain.FAITHFULNESS_STEPS,
                   metavar="S", help=f"steps of each curve (default: {explain.FAITHFULNESS_STEPS})")
    g.add_argument("--sanity-images", type=bounded_int(0, 10 ** 7), default=explain.SANITY_IMAGES, metavar="M",
                   help=f"test images for the cascading-randomization sanity check (default: "
                        f"{explain.SANITY_IMAGES}; 0: skip)")
    g.add_argument("--example-images", type=bounded_int(0, 10 ** 9), default=None, metavar="K",
                   help="the first K test images searched for each channel's top-9 (default: all; 0: skip)")
    g.add_argument("--methods", type=attribution_methods, default=None, metavar="M1,M2",
                   help="attribution methods to draw and score, comma-separated, from: " + ", ".join(explain.METHODS)
                        + " (default: all)")
    g.add_argument("--no-explanations", action="store_true", help="skip all of the above")


def attribution_methods(text: str) -> tuple[str, ...]:
    """``--methods saliency,grad_cam``: names checked against the one registry (cifarlab.explain.METHODS)."""
    import argparse

    from ..explain import check_methods

    try:
        return check_methods(text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def explain_settings(args):
    from ..explain import ExplainSettings

    default = ExplainSettings()
    return ExplainSettings(enabled=not getattr(args, "no_explanations", False),
                           faithfulness_images=getattr(args, "faithfulness_images", default.faithfulness_images),
                           faithfulness_steps=getattr(args, "faithfulness_steps", default.faithfulness_steps),
                           sanity_images=getattr(args, "sanity_images", default.sanity_images),
                           example_images=getattr(args, "example_images", default.example_images),
                           methods=getattr(args, "methods", None))


def run(args) -> int:
    from ..checkpoints import check_input_shape, load_checkpoint
    from ..visualize import StimulusSettings, render_all

    ckpt = load_checkpoint(args.checkpoint)
    path = Path(args.checkpoint)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "visualize"
    data = load_data(args, stored=ckpt.meta.get("dataset"))
    check_input_shape(ckpt, data.image_shape)  # a model that flattens takes its own size only
    settings = StimulusSettings.for_method(args.method, steps=args.steps, fft=args.fft or None)
    result = render_all(ckpt, out, data=data, seed=args.seed, images=args.images, settings=settings,
                        threads=args.threads or None, cam_layer=args.layer, max_channels=args.max_channels,
                        explanations=explain_settings(args))
    print(f"written to {result.out_dir}/: " + ", ".join(Path(f).name for f in result.files.values()))
    return 0
