"""``cifarlab train`` (checkpoints, metrics, curves) and ``cifarlab run`` (the main job: train, evaluate,
visualize, report)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..errors import CifarlabError
from .args import EXIT_INTERRUPTED, add_data_args, add_recipe_args, bounded_int, load_data, recipe_from_args


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: train, evaluate, visualize, report")
    add_train_args(p)
    p.add_argument("--no-visualize", action="store_true", help="skip stimuli and the HTML report")
    p.set_defaults(func=lambda args: train_command(args, evaluate_after=True))

    p = sub.add_parser("train", help="train only (checkpoints, metrics.csv, training curves)")
    add_train_args(p)
    p.set_defaults(func=lambda args: train_command(args, evaluate_after=False))


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ..recipes import PRESETS

    g = p.add_argument_group("recipe (defaults come from --preset)")
    g.add_argument("--preset", default="exercise", choices=sorted(PRESETS), help="recipe preset (default: exercise)")
    add_recipe_args(g)
    r = p.add_argument_group("running")
    r.add_argument("--name", help="run name (default: PRESET-DATE-TIME); the run folder is RUNS_DIR/NAME")
    r.add_argument("--runs-dir", default="runs")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--resume", action="store_true", help="continue the run NAME from its last good checkpoint")
    r.add_argument("--checkpoint-every", type=bounded_int(0, 10 ** 9), default=0,
                   help="also checkpoint every N steps (default: every epoch only)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model (measure first: see bench/)")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast or fp32 (default auto: bf16 on CUDA and on CPUs with native bf16)")
    r.add_argument("--threads", type=bounded_int(1, 1024), help="CPU threads (default: all cores)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway when stderr is "
                                                               "not a terminal)")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    r.add_argument("--max-steps", type=bounded_int(1, 10 ** 9), help=argparse.SUPPRESS)
    r.add_argument("--train-subset", type=bounded_int(1, 10_000_000),
                   help="train on the first N training images only (quick checks; evaluation still uses all "
                        "test images)")
    add_data_args(p)


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA; one device per local rank."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return args.device
    backend = "nccl" if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def train_command(args, evaluate_after: bool) -> int:
    import torch

    from ..train import TrainingInterrupted, dist_info, train

    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_distributed(args)
    recipe = recipe_from_args(args)
    name = args.name or f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.runs_dir) / name
    is_main = dist_info().is_main
    log = print if is_main else (lambda *a, **k: None)
    data = load_data(args, log=log)
    if args.train_subset:
        if args.train_subset > len(data.train):
            raise CifarlabError(f"--train-subset {args.train_subset} is more than the {len(data.train):,} training "
                                f"images of {data.spec}")
        data = data.with_train(data.train.subset(slice(0, args.train_subset)), f"first {args.train_subset}")
    try:
        result = train(recipe, data, run_dir, device=device, resume=args.resume,
                       checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                       compile=args.compile, log=log, max_steps=args.max_steps, tensorboard=args.tensorboard,
                       precision=args.precision)
    except TrainingInterrupted as e:
        log(f"\n{e}. Continue with: cifarlab {args.command} --name {name} --resume")
        return EXIT_INTERRUPTED
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not is_main:
        return 0
    from .. import plots

    if result.history:
        plots.training_curves(result.history, run_dir / "training_curves.png", val_source="validation")
    log(f"trained in {result.seconds:.1f} s; run folder: {run_dir}")
    if evaluate_after and (run_dir / "final").exists():
        evaluate_and_report(args, run_dir, data, recipe.seed, log)
    return 0


def evaluate_and_report(args, run_dir: Path, data, seed: int, log) -> None:
    from .. import pipeline
    from ..checkpoints import load_checkpoint

    ckpt = load_checkpoint(run_dir / "final")
    ev, files = pipeline.evaluate_to_folder(ckpt, data, run_dir / "eval", seed=seed)
    results = json.loads(Path(files["results"]).read_text())
    log(pipeline.results_summary(results))
    if not getattr(args, "no_visualize", False):
        from ..report import build_report

        log(f"report: {build_report(run_dir, ckpt=ckpt, data=data, log=log)}")
    log(f"\nEverything is in {run_dir}/:")
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts):
        log(f"  {path}")
