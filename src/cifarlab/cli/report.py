"""``cifarlab report``: RUN/report.html, one self-contained page."""
from __future__ import annotations

from pathlib import Path

from ..errors import ReportError
from ..report import CELL_IMAGES, MAP_METHODS, MAP_POINTS
from .args import add_data_args, bounded_int, load_data


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN/report.html: numbers, plots and visualizations on one page")
    p.add_argument("run", metavar="RUN", help="a run folder (with final/ or checkpoints/)")
    p.add_argument("--method", choices=["default", "exercise"], default="default",
                   help="stimulus method for the layer stimuli (class stimuli show both)")
    p.add_argument("--fft", action="store_true", help="default method: Fourier parameterization")
    p.add_argument("--seed", type=bounded_int(0, 2 ** 63 - 1), help="stimulus seed (default: the recipe's)")
    p.add_argument("--images", type=bounded_int(0, 10 ** 9), nargs="+", metavar="IDX",
                   help="test images for activation maps, saliency and Grad-CAM")
    p.add_argument("--map", choices=MAP_METHODS, default="pca", dest="map_method",
                   help="the feature map's 2-D projection: pca (default) or umap (needs pip install umap-learn)")
    p.add_argument("--map-points", type=bounded_int(3, 100_000), default=MAP_POINTS, metavar="N",
                   help=f"test images on the feature map, a seeded random subsample (default {MAP_POINTS:,})")
    p.add_argument("--cell-images", type=bounded_int(1, 10_000), default=CELL_IMAGES, metavar="N",
                   help=f"test images shown per confusion-matrix cell, the first N (default {CELL_IMAGES})")
    from .visualize import add_explain_args

    add_explain_args(p)
    add_data_args(p, default_help="the data the run was trained on")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import load_checkpoint
    from ..report import build_report
    from ..visualize import StimulusSettings

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder")
    ckpt = load_checkpoint(run_dir)
    data = load_data(args, stored=ckpt.meta.get("dataset"))
    settings = StimulusSettings.for_method(args.method, fft=args.fft or None)
    from .visualize import explain_settings

    path = build_report(run_dir, ckpt=ckpt, data=data, settings=settings, seed=args.seed, images=args.images,
                        explanations=explain_settings(args), map_method=args.map_method,
                        map_points=args.map_points, cell_images=args.cell_images)
    print(f"report: {path}")
    return 0
