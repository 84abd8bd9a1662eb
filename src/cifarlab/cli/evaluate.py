"""``cifarlab evaluate``: test accuracy, per-class accuracy, confusion matrix, galleries of a checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import add_data_args, add_tta_argument, bounded_float, bounded_int, load_data


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix, galleries")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--model", help="fail unless the checkpoint holds this architecture")
    add_tta_argument(p, "(default: as the checkpoint's recipe says)")
    p.add_argument("--tta-below", type=bounded_float(0.0, 1.0), metavar="P",
                   help="selective TTA: augment only the images whose top class probability is below P "
                        "(one plain pass for all; faster, accuracy measured in the README)")
    p.add_argument("--seed", type=bounded_int(0, 2 ** 32 - 1), default=0, help="for the random gallery")
    p.add_argument("--device")
    p.add_argument("--on", action="append", default=[], metavar="SPEC",
                   help="also evaluate on this test set of the same classes and report the accuracy gap with 95%% "
                        "intervals (e.g. cifar10.1); repeatable")
    p.add_argument("--ood", action="extend", nargs="+", default=[], metavar="SET",
                   help="out-of-distribution detection against these sets, the test set as in-distribution: "
                        "AUROC and FPR at 95%% TPR of the KNN, MSP and energy scores (bootstrap 95%% intervals "
                        "below 2,000 images), score histograms; eval/ood.json. SET: noise (Gaussian noise), "
                        "permuted (test images, pixels shuffled), folder:PATH or a folder (photos, fitted like "
                        "the run's data), or a dataset name (its test images). Needs the run folder; builds its "
                        "feature bank once (RUN/ood/)")
    p.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    add_data_args(p, default_help="the data the checkpoint was trained on")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import pipeline
    from ..checkpoints import check_input_shape, load_checkpoint
    from ..data import load_dataset, parse_spec, stored_options

    if args.device:
        from ..devices import resolve_device

        resolve_device(args.device)  # before anything is loaded or any folder made
    ckpt = load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    data = load_data(args, stored=ckpt.meta.get("dataset"), log=lambda *a, **k: None if args.json else print(*a))
    if args.model:
        pipeline.check_compatible(ckpt, data, args.model)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "eval"
    # A shifted folder is fitted to the size and in the way the model was trained on.
    fitted = {k: v for k, v in stored_options(ckpt.meta.get("dataset") or {}).items() if k in ("image_size", "fit")}
    shifted = [load_dataset(spec, download=not args.no_download, progress=not args.json,
                            **(fitted if parse_spec(spec)[0] == "folder" else {})) for spec in args.on]
    for ds, what in [(data, "the data"), *((d, f"--on {d.spec or d.name}") for d in shifted)]:
        check_input_shape(ckpt, ds.image_shape, what)  # a model that flattens takes its own size only
    detector, ood_sets = _ood_inputs(args, ckpt, data, quiet=args.json)  # fails before anything is written
    ev, files = pipeline.evaluate_to_folder(ckpt, data, out, seed=args.seed, tta=args.tta, device=args.device,
                                            shifted=shifted, tta_below=args.tta_below)
    results = json.loads(Path(files["results"]).read_text())
    ood_results = None
    if detector is not None:
        from .. import ood

        ood_results, ood_files = ood.evaluate_ood(detector, data.test.images, ood_sets, out, seed=args.seed,
                                                  dataset=data.spec or data.name,
                                                  log=(lambda *a, **k: None) if args.json else print)
        files.update(ood_files)
    if args.json:
        print(json.dumps(dict(results, files=files, **({"ood": ood_results} if ood_results else {})), indent=2))
    else:
        print(pipeline.results_summary(results))
        if ood_results:
            from ..ood import summary

            print(summary(ood_results))
        print(f"written to {out}/: " + ", ".join(Path(f).name for f in files.values()))
    return 0


def _ood_inputs(args, ckpt, data, quiet: bool):
    """(the run's OOD detector, the OOD sets) for --ood, or (None, []) without it."""
    if not args.ood:
        return None, []
    from .. import ood

    log = (lambda *a, **k: None) if quiet else print
    if ood.run_dir_of(args.checkpoint) is None and ood.run_dir_of(ckpt.path) is None:
        raise ood.OODError(f"{args.checkpoint}: --ood needs the run folder (its training images make the feature "
                           f"bank, kept in RUN/ood/)")
    # the sets first: a misspelled set is refused before the feature bank is built and written into RUN/ood/
    sets = [ood.load_ood_set(spec, ckpt, data, seed=args.seed, download=not args.no_download, log=log)
            for spec in dict.fromkeys(args.ood)]
    detector = ood.prepare(ckpt, data, device=args.device, log=log)
    return detector, sets
