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

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return args.device
    backend = "nccl" if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    if backend == "nccl":
        local = _env_int("LOCAL_RANK", 0)
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise CifarlabError(f"{name}={text[:40]!r} in the environment is not a whole number (torchrun sets it); "
                            f"unset it to train in one process.") from None


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
    if args.name:  # --name '' is no name: the default one, as for a missing --name
        rundir.check_run_name(args.name)  # one plain folder name: never a path out of --runs-dir
    name = args.name or f"{args.preset or 'exercise'}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = run_options_from_args(args)
    run_dir = Path(args.runs_dir) / name
    if args.resume:
        check_run_to_resume(run_dir, Path(args.runs_dir), name)
    device = setup_distributed(args)
    is_main = dist_info().is_main
    log = print if is_main else (lambda *a, **k: None)
    # The folder is this process's from here to the end of the command (evaluation and report included).
    with rundir.claim(run_dir, args.resume) if is_main else contextlib.nullcontext():
        stored = stored_run(run_dir) if args.resume else None
        recipe = resume_recipe(args, stored, run_dir) if stored else recipe_from_args(args, args.preset or "exercise")
        data = load_data(args, stored=stored.get("dataset") if stored else None, log=log,
                         refuse_changes=bool(stored))  # a resume never silently changes the run's data
        subset = args.train_subset or (stored or {}).get("train_subset")
        if subset:
            if subset > len(data.train):
                raise CifarlabError(f"--train-subset {subset} is more than the {len(data.train):,} training "
                                    f"images of {data.spec}")
            data = data.with_train(data.train.subset(slice(0, subset)), f"first {subset}")
        if not stored or args.preset is not None:
            # A new run: the preset's budget adapts what was not given to the data's size. A resume that names
            # the preset again (the first command + --resume) gets the same adapted recipe, so it matches.
            recipe, plan = fit_budget(recipe, len(data.train), explicit=given_recipe_fields(args))
            if plan.changes and not stored:
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


def check_run_to_resume(run_dir: Path, runs_dir: Path, name: str) -> None:
    """--resume continues a run that exists: a mistyped --name is an error naming the runs there, not a new
    run of the default recipe started under that name."""
    from ..errors import short_repr

    if os.path.lexists(run_dir):
        return
    try:
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        runs = []
    shown = ", ".join(short_repr(p.name, 40) for p in runs[:8]) + (", ..." if len(runs) > 8 else "")
    raise CifarlabError(f"--resume: there is no run {short_repr(name, 60)} in {runs_dir} to continue"
                        + (f" (the newest there: {shown})" if runs else "")
                        + "; check --name and --runs-dir, or leave out --resume to start a new run.")


def _subset_of(dataset: dict | None) -> int | None:
    import re

    identity = (dataset or {}).get("identity")
    note = str((identity if isinstance(identity, dict) else {}).get("train_subset") or "")
    found = re.fullmatch(r"first (\d{1,9})", note)
    return int(found.group(1)) if found else None


def stored_run(run_dir: Path) -> dict | None:
    """What a run folder's newest good checkpoint says about the run: recipe, model declaration, dataset
    and training subset. Without a checkpoint (killed before its first), what the run wrote when it started
    (:func:`started_run`); None when it wrote nothing (it starts from scratch, if allowed)."""
    from ..checkpoints import checkpoint_dirs, load_latest

    if not checkpoint_dirs(run_dir):
        return started_run(run_dir)
    ckpt = load_latest(run_dir, with_train_state=True)
    dataset = ckpt.meta.get("dataset") if isinstance(ckpt.meta.get("dataset"), dict) else None
    return {"recipe": ckpt.train_state.get("recipe") or ckpt.meta.get("recipe") or {},
            "architecture": ckpt.model.declaration, "dataset": dataset, "train_subset": _subset_of(dataset)}


def started_run(run_dir: Path) -> dict | None:
    """recipe.json and dataset.json of a run killed before its first checkpoint, each checked, so that
    ``--resume`` starts it again as it was asked for (its preset, data and subset), not as the defaults."""
    from ..recipes import Recipe, saved_recipe
    from ..validation import load_json_file

    recipe_file, dataset_file = run_dir / "recipe.json", run_dir / "dataset.json"
    if not os.path.lexists(recipe_file):
        return None
    saved = load_json_file(recipe_file, "the run's recipe", CifarlabError, max_bytes=1 << 20)
    try:
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, not {type(saved).__name__}")
        recipe = saved_recipe(saved)
        Recipe(**recipe).validate()
    except (TypeError, ValueError, CifarlabError) as e:
        raise CifarlabError(f"{recipe_file}: not a usable recipe ({e}); the run cannot be resumed from it. Start a "
                            f"new run (another --name).") from None
    dataset = None
    if os.path.lexists(dataset_file):
        dataset = load_json_file(dataset_file, "the run's dataset", CifarlabError)
        if not isinstance(dataset, dict) or not isinstance(dataset.get("spec"), str) \
                or not isinstance(dataset.get("identity", {}), dict):
            raise CifarlabError(f"{dataset_file}: expected an object with a 'spec' string and an 'identity' object; "
                                f"the run cannot be resumed from it. Start a new run (another --name).")
        dataset.pop("files", None)  # which photo is in which split: a record, not an option
    return {"recipe": recipe, "architecture": None, "dataset": dataset, "train_subset": _subset_of(dataset)}


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
    if "model" not in given and saved.get("model") not in MODELS and stored["architecture"]:
        declaration = run_dir / "model.json"
        atomic_write_json(declaration, stored["architecture"])
        saved["model"] = str(declaration)
    return replace(Recipe(**saved), **given).validate()


def resume_command(args, options, name: str) -> str:
    """A command that continues this run: the recipe, model and data are stored in the run; where it
    lives and how it runs (the resumable :class:`RunOptions` away from their defaults) are repeated."""
    import shlex

    world, per_node = _env_int("WORLD_SIZE", 1), _env_int("LOCAL_WORLD_SIZE", 0)
    nodes = world // per_node if per_node and world % per_node == 0 else 1
    launcher = ["cifarlab"]
    if world > 1:  # the same number of processes (every rank's state is in the checkpoint)
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []),
                    f"--nproc_per_node={per_node if nodes > 1 else world}", "-m", "cifarlab"]
    parts = [*launcher, args.command, "--name", name]
    if Path(args.runs_dir) != Path("runs"):
        parts += ["--runs-dir", str(args.runs_dir)]
    if getattr(args, "data_dir", None):
        parts += ["--data-dir", str(args.data_dir)]
    command = shlex.join(parts + options.resume_flags() + ["--resume"])
    return command + (" (with the same rendezvous options on every node)" if nodes > 1 else "")


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
