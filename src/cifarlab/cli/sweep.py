"""``cifarlab sweep SWEEP_DIR``: hyperparameter search on Optuna (see :mod:`cifarlab.sweep`)."""
from __future__ import annotations

from .args import (EXIT_INTERRUPTED, add_data_args, add_preset_and_recipe_args, bounded_float, bounded_int,
                   load_data, recipe_from_args)

DESCRIPTION = """\
Search recipe settings with Optuna (TPE sampler). Each trial is a normal run folder SWEEP_DIR/trial-NNNN
trained from the recipe (--preset and the recipe options) with the searched fields replaced; trials are
compared on their final accuracy on --val-split N images held out of the training set (required: a search
never tunes on the test set). Declare what to search with --param NAME=KIND:... (repeatable) or a --space
JSON file: KIND is float:LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH, intlog:LOW:HIGH or choice:A,B,C, within the
recipe field's own bounds and choices. The study lives in --storage (default: SQLite in SWEEP_DIR/study.db):
re-running the same command continues it without repeating finished trials; a trial killed mid-way is
marked failed and its parameters run again as a new trial. --workers N runs N processes on this machine
sharing the storage; for many machines, give every machine the same --storage database URL (e.g.
postgresql://user:password@host/db) and SWEEP_DIR on a shared filesystem. Prints the best trials and
writes SWEEP_DIR/trials.csv and SWEEP_DIR/search.png."""


def register(sub) -> None:
    from ..precision import PRECISIONS
    from ..sweep import PRUNERS

    p = sub.add_parser("sweep", help="hyperparameter search (Optuna): trials are run folders; prints the best",
                       description=DESCRIPTION)
    p.add_argument("folder", metavar="SWEEP_DIR", help="the sweep's folder (trial run folders, study.db, results)")
    s = p.add_argument_group("search")
    s.add_argument("--param", action="append", default=[], metavar="NAME=KIND:...",
                   help="a recipe field to search, e.g. lr=log:1e-3:1e-1, batch_size=intlog:32:512, "
                        "optimizer=choice:sgd,adamw (repeatable)")
    s.add_argument("--space", metavar="FILE.json",
                   help='a search space file: {"params": {"lr": "log:1e-3:1e-1", "optimizer": {"type": '
                        '"choice", "values": ["sgd", "adamw"]}}}')
    s.add_argument("--trials", type=bounded_int(1, 100_000), default=20,
                   help="finished trials the study should hold (default: 20; a re-run continues up to it)")
    s.add_argument("--timeout", type=bounded_float(1.0, 1e8), metavar="SECONDS",
                   help="start no new trial after this many seconds (a running trial finishes)")
    s.add_argument("--study-name", help="the study's name in the storage (default: SWEEP_DIR's name)")
    s.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///SWEEP_DIR/study.db; "
                                                    "a database URL shares one study between machines)")
    s.add_argument("--workers", type=bounded_int(1, 256), default=1,
                   help="worker processes on this machine sharing the study (default: 1)")
    s.add_argument("--pruner", choices=PRUNERS, default="hyperband",
                   help="stop unpromising trials after an epoch: hyperband (default), halving (successive "
                        "halving), median, none")
    s.add_argument("--sampler-seed", type=bounded_int(0, 2 ** 31 - 1), default=0,
                   help="seed of the TPE sampler (worker i uses seed + i x 1000003)")
    add_preset_and_recipe_args(p, "the recipe every trial starts from (--val-split N is required)")
    r = p.add_argument_group("running")
    r.add_argument("--train-subset", type=bounded_int(1, 10_000_000), help="search on the first N training images")
    r.add_argument("--threads", type=bounded_int(1, 1024),
                   help="CPU threads per worker (default: the cores divided among the workers)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for train (default: auto)")
    r.add_argument("--no-progress", action="store_true", help="no download progress bar")
    add_data_args(p)
    p.set_defaults(func=sweep_command)


def sweep_command(args) -> int:
    from .. import sweep
    from ..devices import resolve_device
    from .train import given_recipe_fields

    if args.device:
        resolve_device(args.device)
    recipe = recipe_from_args(args)
    sweep.require_validation_split(recipe)  # before loading anything
    space = sweep.build_space(args.param, args.space, recipe)
    data = load_data(args)
    request = sweep.DataRequest.of(data, args.data_dir, args.train_subset)
    data = sweep.subset(data, args.train_subset)
    config = sweep.Sweep(folder=args.folder, space=space, recipe=recipe, explicit=frozenset(given_recipe_fields(args)),
                         data=request, trials=args.trials, timeout=args.timeout, study_name=args.study_name or "",
                         storage=args.storage or "", workers=args.workers, pruner=args.pruner,
                         sampler_seed=args.sampler_seed, threads=args.threads, device=args.device,
                         precision=args.precision)
    print(f"sweep {config.study_name!r}: {args.trials} trials of {recipe.model} ({args.preset} recipe) on "
          f"{len(data.train):,} images of {data.spec}, validated on {recipe.val_split} of them; searching "
          + ", ".join(f"{n} {p.describe()}" for n, p in space.items()) + f"; pruner {args.pruner}")
    try:
        sweep.run_sweep(config, data)
    except KeyboardInterrupt:
        print("\ninterrupted; the running trials will run again. Continue with the same command.")
        return EXIT_INTERRUPTED
    return 0
