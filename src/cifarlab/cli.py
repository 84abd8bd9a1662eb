"""The ``cifarlab`` command: a thin layer of argparse over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import CifarlabError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------------
# Argument types that reject hostile values before anything is allocated


def _bounded_int(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def _bounded_float(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (lo <= value <= hi):  # also rejects nan
            raise argparse.ArgumentTypeError(f"{text} is outside {lo}..{hi}")
        return value
    return parse


def add_tta_argument(p, default_help: str) -> None:
    """--tta (flip, level 1), --tta-level N, --no-tta (0); None means "as the recipe says".
    --tta stays a plain flag so it never swallows the positional argument after it."""
    p.add_argument("--tta", dest="tta", action="store_const", const=1, default=None,
                   help=f"flip test-time augmentation (same as --tta-level 1) {default_help}")
    p.add_argument("--tta-level", dest="tta", type=_bounded_int(0, 2), metavar="N",
                   help="test-time augmentation: 0 none, 1 flip, 2 flip + 1-pixel translations (airbench)")
    p.add_argument("--no-tta", dest="tta", action="store_const", const=0, help="same as --tta-level 0")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="cifar-10-batches-bin folder, its parent, or cifar-10-binary.tar.gz "
                                      "(default: $CIFARLAB_DATA, then the cache, else download)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading the data")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import PRESETS

    g = p.add_argument_group("recipe (defaults come from --preset)")
    g.add_argument("--preset", default="exercise", choices=sorted(PRESETS), help="recipe preset (default: exercise)")
    g.add_argument("--model", help="registered model name or a .json/.toml declaration file")
    g.add_argument("--epochs", type=_bounded_int(1, 10_000))
    g.add_argument("--batch-size", type=_bounded_int(1, 65_536), help="per process under torchrun")
    g.add_argument("--optimizer", choices=["adamax", "adam", "adamw", "sgd"])
    g.add_argument("--lr", type=_bounded_float(1e-12, 100.0), help="initial / peak learning rate")
    g.add_argument("--schedule", choices=["exp", "onecycle", "linear", "constant"])
    g.add_argument("--lr-decay", type=_bounded_float(1e-6, 1.0), help="per-epoch factor for --schedule exp")
    g.add_argument("--warmup", type=_bounded_float(0.0, 0.99))
    g.add_argument("--lr-start", type=_bounded_float(0.0, 1.0), help="onecycle/linear: first lr, fraction of peak")
    g.add_argument("--lr-end", type=_bounded_float(0.0, 1.0), help="onecycle/linear: last lr, fraction of peak")
    g.add_argument("--momentum", type=_bounded_float(0.0, 0.999))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=_bounded_float(0.0, 0.99))
    g.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=None,
                   help="sgd: decay biases and BatchNorm too (default: weights only)")
    g.add_argument("--bn-lr-scale", type=_bounded_float(1e-6, 1000.0), help="sgd: lr multiplier for BatchNorm")
    g.add_argument("--lookahead", type=_bounded_int(0, 10_000), help="airbench lookahead every N steps (0: off)")
    g.add_argument("--whiten-bias-epochs", type=_bounded_int(0, 10_000),
                   help="train the whitening layer's bias during the first N epochs")
    g.add_argument("--label-smoothing", type=_bounded_float(0.0, 0.99))
    g.add_argument("--normalization", choices=["exercise", "standard"])
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--alt-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="with --flip: each image mirrored in every other epoch (airbench) instead of at random")
    g.add_argument("--translate", type=_bounded_int(0, 16))
    g.add_argument("--translate-pad", choices=["zeros", "reflect"])
    g.add_argument("--cutout", type=_bounded_int(0, 32))
    add_tta_argument(g, "when validating")
    g.add_argument("--seed", type=_bounded_int(0, 2 ** 63 - 1))
    g.add_argument("--val-split", type=_bounded_int(0, 49_999),
                   help="hold out N training images for validation (default: validate on the test set)")
    r = p.add_argument_group("running")
    r.add_argument("--name", help="run name (default: PRESET-DATE-TIME); the run folder is RUNS_DIR/NAME")
    r.add_argument("--runs-dir", default="runs")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--resume", action="store_true", help="continue the run NAME from its last good checkpoint")
    r.add_argument("--checkpoint-every", type=_bounded_int(0, 10 ** 9), default=0,
                   help="also checkpoint every N steps (default: every epoch only)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model (measure first: see bench/)")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast or fp32 (default auto: bf16 on CUDA and on CPUs with native bf16)")
    r.add_argument("--threads", type=_bounded_int(1, 1024), help="CPU threads (default: all cores)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    r.add_argument("--max-steps", type=_bounded_int(1, 10 ** 9), help=argparse.SUPPRESS)
    r.add_argument("--train-subset", type=_bounded_int(1, 50_000),
                   help="train on the first N training images only (quick checks; evaluation still uses all test images)")
    _add_data_args(p)


def _recipe(args):
    from .train import Recipe, recipe_from

    overrides = {f: getattr(args, f, None) for f in Recipe.__dataclass_fields__ if f != "model"}
    overrides["model"] = args.model
    return recipe_from(args.preset, **overrides)


def _load_data(args):
    from .data import load_cifar10

    return load_cifar10(args.data_dir, download=not args.no_download, progress=not getattr(args, "no_progress", False))


def _setup_distributed(args):
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


def _train_run(args, evaluate_after: bool):
    import torch

    from . import pipeline, plots
    from .train import TrainingInterrupted, dist_info, train

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _setup_distributed(args)
    recipe = _recipe(args)
    name = args.name or f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.runs_dir) / name
    if not args.resume and (run_dir / "checkpoints").exists():
        raise CifarlabError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name.")
    data = _load_data(args)
    if args.train_subset:
        from .data import CIFAR10

        data = CIFAR10(train=data.train.subset(slice(0, args.train_subset)), test=data.test,
                       classes=data.classes, root=data.root)
    is_main = dist_info().is_main
    log = print if is_main else (lambda *a, **k: None)
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
    if result.history:
        plots.training_curves(result.history, run_dir / "training_curves.png", val_source="validation")
    log(f"trained in {result.seconds:.1f} s; run folder: {run_dir}")
    if evaluate_after and (run_dir / "final").exists():
        from .checkpoints import load_checkpoint

        ckpt = load_checkpoint(run_dir / "final")
        ev, files = pipeline.evaluate_to_folder(ckpt, data, run_dir / "eval", seed=recipe.seed)
        results = json.loads(Path(files["results"]).read_text())
        log(pipeline.results_summary(results))
        _after_evaluation(args, run_dir, ckpt, data, log)
        log(f"\nEverything is in {run_dir}/:")
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts):
            log(f"  {path}")
    return 0


def _after_evaluation(args, run_dir, ckpt, data, log):
    """Stimuli and the HTML report at the end of ``run`` (skipped with --no-visualize)."""
    if getattr(args, "no_visualize", False):
        return
    from . import report

    path = report.build_report(run_dir, ckpt=ckpt, data=data, log=log)
    log(f"report: {path}")


# ---------------------------------------------------------------------------------------------------
# Commands


def cmd_run(args):
    return _train_run(args, evaluate_after=True)


def cmd_train(args):
    return _train_run(args, evaluate_after=False)


def cmd_evaluate(args):
    from . import pipeline
    from .checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    data = _load_data(args)
    if args.model:
        pipeline.check_compatible(ckpt, data, args.model)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "eval"
    ev, files = pipeline.evaluate_to_folder(ckpt, data, out, seed=args.seed, tta=args.tta, device=args.device)
    results = json.loads(Path(files["results"]).read_text())
    if args.json:
        print(json.dumps(dict(results, files=files), indent=2))
    else:
        print(pipeline.results_summary(results))
        print(f"written to {out}/: " + ", ".join(Path(f).name for f in files.values()))
    return 0


def cmd_summary(args):
    from .models import get_declaration, summary

    if args.checkpoint:
        from .checkpoints import load_checkpoint

        print(summary(load_checkpoint(args.checkpoint).model))
    else:
        print(summary(get_declaration(args.model)))
    return 0


def cmd_models(args):
    from .models import MODELS, count_parameters
    from .train import PRESETS

    print(f"{'model':<14}{'parameters':>12}  description")
    for name, decl in MODELS.items():
        print(f"{name:<14}{count_parameters(decl):>12,}  {decl.get('description', '')}")
    print("\npresets: " + ", ".join(f"{k} (model {v.model}, {v.epochs} epochs)" for k, v in PRESETS.items()))
    return 0


def cmd_data(args):
    from .data import load_cifar10

    data = load_cifar10(args.data_dir, download=not args.no_download)
    print(f"CIFAR-10 at {data.root}: {len(data.train):,} training and {len(data.test):,} test images, "
          f"all files match their md5; classes: {', '.join(data.classes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cifarlab", description="Define a CNN, train it on CIFAR-10, evaluate "
                                     "it, and see what it learned.")
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: train, evaluate, visualize, report")
    _add_train_args(p)
    p.add_argument("--no-visualize", action="store_true", help="skip stimuli and the HTML report")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train only (checkpoints, metrics.csv, training curves)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix, galleries")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--model", help="fail unless the checkpoint holds this architecture")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    p.add_argument("--seed", type=_bounded_int(0, 2 ** 32 - 1), default=0, help="for the random gallery")
    p.add_argument("--device")
    p.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    _add_data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="Keras-style table of a model's layers, shapes and parameters")
    p.add_argument("--model", default="exercise", help="registered name or .json/.toml declaration")
    p.add_argument("--checkpoint", help="summarize the model stored in a checkpoint instead")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list registered models and presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="find (or download) and verify CIFAR-10")
    _add_data_args(p)
    p.set_defaults(func=cmd_data)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that live in their own modules register themselves (their heavy imports stay lazy)."""
    from . import export, keras_import, predict, report, visualize

    for module in (visualize, report, predict, export, keras_import):
        module.add_cli(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CifarlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # recipe validation and similar user-value errors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a full disk, an unwritable folder: say so, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
