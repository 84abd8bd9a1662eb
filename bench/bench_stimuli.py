"""How long rendering all maximum stimuli takes, and how convincing the class stimuli are.

For a checkpoint (meant: the fully trained exercise net), renders the stimuli of every conv layer's
channels and of every class with cifarlab.visualize.all_stimuli, --repeats times per method after one
untimed warm-up run, and prints the median seconds per layer and in total, plus the grader check: the
probability the net gives class k for the uint8 stimulus of class k (re-normalized), for each k.

    python bench/bench_stimuli.py /tmp/ex1/final [--repeats 3] [--methods default exercise] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, table  # noqa: E402

from cifarlab import visualize as V  # noqa: E402
from cifarlab.checkpoints import load_checkpoint  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402


def time_method(model, normalization, settings, repeats: int, threads: int) -> tuple[dict, float, list]:
    """Per-layer and total median seconds (after one untimed warm-up), the cold first total, and the
    stimuli of the last repeat (all repeats are identical: same seed)."""
    cold_start = time.perf_counter()
    V.all_stimuli(model, normalization, settings, seed=0, threads=threads)  # warm-up: kernel and allocator set-up
    cold = time.perf_counter() - cold_start
    per_layer: dict[str, list[float]] = {}
    totals, stimuli = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        stimuli = V.all_stimuli(model, normalization, settings, seed=0, threads=threads)
        totals.append(time.perf_counter() - start)
        for s in stimuli:
            per_layer.setdefault(s.target.name, []).append(s.seconds)
    medians = {name: median(v) for name, v in per_layer.items()}
    medians["total"] = median(totals)
    return medians, cold, stimuli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run folder, checkpoint folder or .safetensors file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(V.METHODS), choices=V.METHODS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="intra-op thread counts to compare (the library's default is 1)")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model.eval()
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    classes = ckpt.meta["classes"]
    targets = V.stimulus_targets(model)
    header("Maximum stimuli: time to render all of them, and the grader check",
           f"cifarlab.visualize.all_stimuli on {ckpt.path} ({ckpt.meta['architecture']['name']}, "
           f"{sum(t.channels for t in targets)} stimuli: "
           f"{' + '.join(str(t.channels) for t in targets)}), one batch per layer, default settings of each "
           f"method; median seconds over {args.repeats} repeats after one untimed warm-up in the same process "
           f"('cold' = that first run); then p(class k | uint8 stimulus of class k), re-normalized with the "
           f"checkpoint's normalization")
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min; other "
          f"processes share the cores)\n")
    time_rows, prob_rows, minimum = [], {c: {"class": c} for c in classes}, {"class": "minimum"}
    for method in args.methods:
        settings = V.StimulusSettings.for_method(method)
        for threads in args.threads:
            medians, cold, stimuli = time_method(model, normalization, settings, args.repeats, threads)
            row = {"method": method, "steps": settings.steps, "threads": threads, "cold total s": cold}
            row.update({f"{t.name} s": medians[t.name] for t in targets})
            row["total s (median)"] = medians["total"]
            time_rows.append(row)
        p = V.grader_check(model, stimuli[-1].images, normalization)  # same seed: same images for any threads
        for c, v in zip(classes, p):
            prob_rows[c][f"p {method}"] = f"{v:.6f}"
        minimum[f"p {method}"] = f"{p.min():.6f}"
        if method == "exercise":  # and as the exercise's grader did it: raw 0..255 into the net
            raw = V.grader_check(model, stimuli[-1].images, normalization, renormalize=False)
            for c, v in zip(classes, raw):
                prob_rows[c]["p exercise, raw 0..255 (quirk)"] = f"{v:.6f}"
            minimum["p exercise, raw 0..255 (quirk)"] = f"{raw.min():.6f}"
    print(table(time_rows, list(time_rows[0])))
    print(f"\n# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print(table(list(prob_rows.values()) + [minimum], list(minimum)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
