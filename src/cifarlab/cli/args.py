"""What several commands share: value types that reject hostile input before anything is allocated,
the data options, the training options (built from the :class:`~cifarlab.recipes.Recipe` fields) and
the exit codes."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..errors import CifarlabError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def bounded_int(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def bounded_float(lo: float, hi: float):
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
    p.add_argument("--tta-level", dest="tta", type=bounded_int(0, 2), metavar="N",
                   help="test-time augmentation: 0 none, 1 flip, 2 flip + 1-pixel translations (airbench)")
    p.add_argument("--no-tta", dest="tta", action="store_const", const=0, help="same as --tta-level 0")


# ---------------------------------------------------------------------------------------------------
# Data


def add_data_args(p: argparse.ArgumentParser, default_help: str = "cifar10") -> None:
    from ..data import DATASETS
    from ..data.folder import AUTO_LARGE_FROM, AUTO_SIZES
    from ..images import DEFAULT_FIT, DEFAULT_FIT_WHY, FITS

    g = p.add_argument_group("data")
    g.add_argument("--dataset", metavar="SPEC",
                   help="one of: " + ", ".join(e.usage for e in DATASETS.values()) + f" (default: {default_help})")
    g.add_argument("--data-dir", help="the dataset's folder, its parent, or its official .tar.gz archive "
                                      "(default: $CIFARLAB_DATA, then the cache, else download)")
    g.add_argument("--no-download", action="store_true", help="fail instead of downloading the data")
    g.add_argument("--image-size", type=bounded_int(8, 512), default=None,
                   help=f"folder datasets: pictures are made this size square (default: auto, from the photos: "
                        f"{AUTO_SIZES[1]} when their median shorter side is at least {AUTO_LARGE_FROM} px, else "
                        f"{AUTO_SIZES[0]}; a checkpoint's data: its own size; CIFAR: 32, the only size)")
    g.add_argument("--fit", choices=FITS, default=None,
                   help=f"folder datasets: how a non-square picture becomes square: crop (the centered square; "
                        f"the sides are lost), squish (all of it, stretched), pad (all of it, aspect kept, "
                        f"mirrored margins) (default: {DEFAULT_FIT}, {DEFAULT_FIT_WHY}; a checkpoint's data: its "
                        f"own fit)")
    g.add_argument("--test-fraction", type=bounded_float(0.01, 0.9), default=None,
                   help="folder datasets without train/ and test/: the stratified test share (default: 0.2; a "
                        "checkpoint's data: its own)")
    g.add_argument("--split-seed", type=bounded_int(0, 2 ** 32 - 1), default=None,
                   help="folder datasets without train/ and test/: the split's seed (default: 0; a checkpoint's "
                        "data: its own)")
    g.add_argument("--strict", action="store_true", help="folder datasets: refuse unreadable images instead of "
                                                        "skipping them")


def load_data(args, stored: dict | None = None, log=print, refuse_changes: bool = False):
    """The dataset the options name, or else the one a checkpoint was trained on (``stored``: its meta's
    "dataset" entry), or else CIFAR-10. Skipped files are listed.

    The checkpoint's own data is loaded as it was: same image size, fit and split; a data option given
    with another value is named as ignored (``refuse_changes``, for a resume or a calibration, which write
    into the run: refused, naming it). Another
    folder named with a checkpoint (the run's photos, moved) takes the checkpoint's image size, fit and
    split unless the options say otherwise (the model was trained on pictures prepared that way). Unset
    options (None) leave the dataset's own default: the automatic size, DEFAULT_FIT, a 0.2 test share
    with seed 0 for folders, 32 for CIFAR."""
    from ..data import load_dataset, parse_spec, stored_options
    from ..data.base import printable

    given = {"image_size": getattr(args, "image_size", None), "fit": getattr(args, "fit", None),
             "test_fraction": getattr(args, "test_fraction", None), "split_seed": getattr(args, "split_seed", None)}
    spec = getattr(args, "dataset", None)
    options = {k: v for k, v in given.items() if v is not None}
    if stored:
        kept = stored_options(stored)
        if not spec:  # the checkpoint's own data, loaded as it was: same size, same fit, same split
            spec = stored.get("spec")
            split = "seed" in ((stored.get("identity") or {}) if isinstance(stored.get("identity"), dict) else {})
            applies = {"image_size", "fit"} | ({"test_fraction", "split_seed"} if split else set())
            changed = [(f"--{k.replace('_', '-')} {v}", f"{k.replace('_', ' ')} {kept[k]}")
                       for k, v in options.items() if k in applies and v != kept[k]]
            if changed and refuse_changes:
                raise CifarlabError(f"the run's data {printable(str(spec))} was prepared with "
                                    + ", ".join(f"{theirs}, not {asked}" for asked, theirs in changed)
                                    + "; resuming or calibrating uses the data as the run prepared it. Leave those "
                                      "options out (or start a new run, another --name).")
            for asked, theirs in changed:
                log(f"note: {asked} ignored: the run's data {printable(str(spec))} is loaded as it was prepared "
                    f"({theirs}); name other data with --dataset")
            options = dict(kept)
        elif parse_spec(spec)[0] == "folder":
            options = dict(kept, **options)
    options.setdefault("test_fraction", 0.2)
    options.setdefault("split_seed", 0)
    ds = load_dataset(spec or "cifar10", data_dir=args.data_dir, download=not args.no_download,
                      progress=not getattr(args, "no_progress", False), strict=getattr(args, "strict", False),
                      log=log, **options)
    for note in ds.notes[:20]:
        log(f"note: {note}")
    if len(ds.notes) > 20:
        log(f"note: ... and {len(ds.notes) - 20} more")
    return ds


# ---------------------------------------------------------------------------------------------------
# Training options, from the Recipe's fields


def add_preset_and_recipe_args(p, title: str) -> None:
    """A "recipe" option group: ``--preset`` (default: exercise) and one option per Recipe field."""
    from ..recipes import PRESETS

    g = p.add_argument_group(title)
    g.add_argument("--preset", default="exercise", choices=sorted(PRESETS), help="recipe preset (default: exercise)")
    add_recipe_args(g)


def add_recipe_args(g) -> None:
    """One option per Recipe field: its name, type, choices, bounds and help come from the field."""
    from ..recipes import Recipe

    for f in fields(Recipe):
        if f.name == "tta":
            add_tta_argument(g, "when validating")
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.get("help") or None
        if f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta.get("choices"):
            g.add_argument(flag, choices=meta["choices"], help=help_text)
        elif meta.get("bounds"):
            lo, hi = meta["bounds"]
            kind = bounded_int if f.type == "int" else bounded_float
            g.add_argument(flag, type=kind(lo, hi), help=help_text)
        else:
            g.add_argument(flag, help=help_text)


def recipe_from_args(args, preset: str | None = None):
    from ..recipes import Recipe, recipe_from

    return recipe_from(preset or args.preset or "exercise",
                       **{f.name: getattr(args, f.name, None) for f in fields(Recipe)})


# ---------------------------------------------------------------------------------------------------
# Run options, from the RunOptions fields


def add_run_args(g) -> None:
    """One option per :class:`~cifarlab.train.RunOptions` field (its help, bounds, choices, CLI default)."""
    from ..train import RunOptions

    for f in fields(RunOptions):
        meta = f.metadata
        if not meta["cli"]:
            continue
        help_text = argparse.SUPPRESS if meta["hidden"] else meta["help"] or None
        if meta["negative"]:  # on by default: only the --no-... flag exists
            g.add_argument(meta["negative"], action="store_true", help=help_text)
        elif f.name == "resume":
            g.add_argument("--resume", action="store_true", help=help_text)
        elif isinstance(meta["cli_default"], bool) or f.name == "channels_last":
            g.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                           default=meta["cli_default"], help=help_text)
        elif meta["choices"]:
            g.add_argument("--" + f.name.replace("_", "-"), choices=meta["choices"], default=meta["cli_default"],
                           help=help_text)
        elif meta["bounds"]:
            g.add_argument("--" + f.name.replace("_", "-"), type=bounded_int(*meta["bounds"]),
                           default=meta["cli_default"], help=help_text)
        else:
            g.add_argument("--" + f.name.replace("_", "-"), default=meta["cli_default"], help=help_text)


def run_options_from_args(args):
    from ..train import RunOptions

    values = {}
    for f in fields(RunOptions):
        if not f.metadata["cli"]:
            continue
        negative = f.metadata["negative"]
        values[f.name] = not getattr(args, negative[2:].replace("-", "_")) if negative else getattr(args, f.name)
    return RunOptions(**values).validate()
