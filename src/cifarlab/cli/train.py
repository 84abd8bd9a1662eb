"""``cifarlab train`` (checkpoints, metrics, curves) and ``cifarlab run`` (the main job: train, evaluate,
visualize, report)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ..errors import CifarlabError
from .args import (EXIT_INTERRUPTED, add_data_args, add_recipe_args, add_run_args, bounded_int, load_data,
                   recipe_from_args, run_options_from_args)


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: train, evaluate, visualize, report")
    add_train_args(p)
    p.add_argument("--no-visualize", action="store_true", help="skip stimuli and the HTML report")
    from .visualize import add_explain_args

    add_explain_args(p)
    p.set_defaults(func=lambda args: train_command(args, evaluate_after=True))

    p = sub.add_parser("train", help="train only (checkpoints, metrics.csv, training curves)")
    add_train_args(p)
    p.set_defaults(func=lambda args: train_command(args, evaluate_after=False))


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ..recipes import PRESETS

    g = p.add_argument_group("recipe (defaults come from --preset)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="recipe preset (default: exercise; with --resume: the run's own recipe)")
    add_recipe_args(g)
    r = p.add_argument_group("running")
    r.add_argument("--name", help="run name (default: PRESET-DATE-TIME); the run folder is RUNS_DIR/NAME")
    r.add_argument("--runs-dir", default="runs")
    add_run_args(r)
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

    from .. import rundir
    from ..budget import fit_budget
    from ..devices import resolve_device
    from ..train import TrainingInterrupted, dist_info, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        resolve_device(args.device)  # one line naming the device and what there is, before anything else
    if args.name is not None:
        rundir.check_run_name(args.name)  # one plain folder name: never a path out of --runs-dir
    name = args.name or f"{args.preset or 'exercise'}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = run_options_from_args(args)
    run_dir = Path(args.runs_dir) / name
    device = setup_distributed(args)
    is_main = dist_info().is_main
    log = print if is_main else (lambda *a, **k: None)
    # The folder is this process's from here to the end of the command (evaluation and report included).
    with rundir.claim(run_dir, args.resume) if is_main else contextlib.nullcontext():
        stored = stored_run(run_dir) if args.resume else None
        recipe = resume_recipe(args, stored, run_dir) if stored else recipe_from_args(args, args.preset or "exercise")
        data = load_data(args, stored=stored.get("dataset") if stored else None, log=log)
        subset = args.train_subset or (stored or {}).get("train_subset")
        if subset:
            if subset > len(data.train):
                raise CifarlabError(f"--train-subset {subset} is more than the {len(data.train):,} training "
                                    f"images of {data.spec}")
            data = data.with_train(data.train.subset(slice(0, subset)), f"first {subset}")
        if not stored:  # a new run: the preset's budget adapts what was not given to the data's size
            recipe, plan = fit_budget(recipe, len(data.train), explicit=given_recipe_fields(args))
            if plan.changes:
                log(f"the preset's budget for {len(data.train):,} training images: {'; '.join(plan.changes)}")
        try:
            result = train(recipe, data, run_dir, replace(options, device=device), log=log)
        except TrainingInterrupted as e:
            log(f"\n{e}. Continue with: {resume_command(args, options, name)}")
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


def given_recipe_fields(args) -> set[str]:
    """The recipe fields given on the command line (the budget never changes them)."""
    from dataclasses import fields

    from ..recipes import Recipe

    return {f.name for f in fields(Recipe) if getattr(args, f.name, None) is not None}


def stored_run(run_dir: Path) -> dict | None:
    """What a run folder's newest good checkpoint says about the run: recipe, model declaration, dataset
    and training subset. None when there is no checkpoint (the run starts from scratch, if allowed)."""
    import re

    from ..checkpoints import checkpoint_dirs, load_latest

    if not checkpoint_dirs(run_dir):
        return None
    ckpt = load_latest(run_dir, with_train_state=True)
    dataset = ckpt.meta.get("dataset") if isinstance(ckpt.meta.get("dataset"), dict) else None
    note = str(((dataset or {}).get("identity") or {}).get("train_subset") or "")
    found = re.fullmatch(r"first (\d+)", note)
    return {"recipe": ckpt.train_state.get("recipe") or ckpt.meta.get("recipe") or {},
            "architecture": ckpt.model.declaration, "dataset": dataset,
            "train_subset": int(found.group(1)) if found else None}


def resume_recipe(args, stored: dict, run_dir: Path):
    """The stored recipe, with the options given on the command line over it (the library then refuses
    any that differ from the run's, naming them). A model declared in a file is resumed from the
    declaration stored in the checkpoint (written beside it as model.json), not from the file, which may
    have changed or moved since."""
    from dataclasses import fields, replace

    from ..fsutil import atomic_write_json
    from ..models import MODELS
    from ..recipes import Recipe, saved_recipe

    if args.preset is not None:  # a preset asked for explicitly: compared as a whole
        return recipe_from_args(args, args.preset)
    saved = saved_recipe(stored["recipe"])
    given = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name, None) is not None}
    if "model" not in given and saved.get("model") not in MODELS:
        declaration = run_dir / "model.json"
        atomic_write_json(declaration, stored["architecture"])
        saved["model"] = str(declaration)
    return replace(Recipe(**saved), **given).validate()


def resume_command(args, options, name: str) -> str:
    """A command that continues this run: the recipe, model and data are stored in the run; where it
    lives and how it runs (the resumable :class:`RunOptions` away from their defaults) are repeated."""
    import shlex

    parts = ["cifarlab", args.command, "--name", name]
    if Path(args.runs_dir) != Path("runs"):
        parts += ["--runs-dir", str(args.runs_dir)]
    if getattr(args, "data_dir", None):
        parts += ["--data-dir", str(args.data_dir)]
    return shlex.join(parts + options.resume_flags() + ["--resume"])


def evaluate_and_report(args, run_dir: Path, data, seed: int, log) -> None:
    from .. import pipeline
    from ..checkpoints import load_checkpoint

    ckpt = load_checkpoint(run_dir / "final")
    ev, files = pipeline.evaluate_to_folder(ckpt, data, run_dir / "eval", seed=seed)
    results = json.loads(Path(files["results"]).read_text())
    log(pipeline.results_summary(results))
    if not getattr(args, "no_visualize", False):
        from ..report import build_report

        from .visualize import explain_settings

        log(f"report: {build_report(run_dir, ckpt=ckpt, data=data, log=log, explanations=explain_settings(args))}")
    log(f"\nEverything is in {run_dir}/:")
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts):
        log(f"  {path}")
