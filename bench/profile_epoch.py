"""Where a training epoch of the exercise recipe spends its time, and how close it gets to the CPU's peak.

Profiles --steps steps of cifarlab's real training loop (train()) with torch.profiler, groups the
operators' self CPU time into convolutions, dense layers, pooling, activations, dropout, loss, optimizer
and data (indexing, normalization), and compares the achieved FLOP rate with a measured sgemm peak.

    python bench/profile_epoch.py --data-dir ../shared/cifar-10-batches-bin [--steps 300] [--precision fp32]

Under bf16 autocast the dtype casts (aten::to / _to_copy) land in the "data" group with the uint8 ->
float conversion of the batch.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, table  # noqa: E402

from cifarlab.data import CIFAR10, load_cifar10  # noqa: E402
from cifarlab.models import build_model  # noqa: E402
from cifarlab.train import recipe_from, resolve_precision, train  # noqa: E402

CATEGORIES = [  # first match wins
    ("convolution", ("conv", "mkldnn_convolution")),
    ("dense (matmul)", ("addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::t")),
    ("pooling", ("max_pool", "pool2d")),
    ("activation", ("leaky_relu", "gelu", "relu", "threshold")),
    ("dropout", ("dropout", "bernoulli", "aten::mul", "aten::div_")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_softmax")),
    ("optimizer", ("adamax", "_foreach", "aten::maximum", "aten::addcdiv", "aten::lerp", "zero_", "aten::fill_")),
    ("data (index, normalize)", ("index", "aten::to", "_to_copy", "copy_", "aten::sub", "aten::div", "randperm",
                                 "aten::clone", "contiguous")),
]


def categorize(name: str) -> str:
    for category, keys in CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "other"


def training_flops_per_image() -> float:
    """Multiply-adds of the exercise net x 2 (FLOPs) x 3 (forward, input grad, weight grad)."""
    model = build_model("exercise")
    flops, shape = 0, (3, 32, 32)
    for layer in model:
        if isinstance(layer, torch.nn.Conv2d):
            shape = (layer.out_channels, shape[1], shape[2])
            flops += 2 * layer.in_channels * 9 * shape[0] * shape[1] * shape[2]
        elif isinstance(layer, torch.nn.MaxPool2d):
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif isinstance(layer, torch.nn.Linear):
            flops += 2 * layer.in_features * layer.out_features
    return 3.0 * flops


def gemm_peak(size: int = 2048, repeats: int = 7, dtype=torch.float32) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / median(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()
    precision = resolve_precision(args.precision, torch.device("cpu"))
    run = {"progress": False, "log": lambda *a: None, "precision": precision}
    data = load_cifar10(args.data_dir, download=False)
    small = CIFAR10(data.train.subset(slice(0, 32 * args.steps)), data.test.subset(slice(0, 100)), data.classes)
    recipe = recipe_from("exercise", epochs=1)
    train(recipe, small, Path("/tmp/cifarlab-profile-warmup"), **run)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = train(recipe, small, Path("/tmp/cifarlab-profile"), **run)
    rate_profiled = result.history[0]["images_per_s"]
    plain = train(recipe, small, Path("/tmp/cifarlab-profile-plain"), **run)
    rate = plain.history[0]["images_per_s"]

    header("Where the exercise recipe's training time goes",
           f"self CPU time by operator group over {args.steps} steps of batch 32, {precision} (torch.profiler), "
           f"then achieved vs measured peak FLOP rate")
    buckets = defaultdict(float)
    for event in prof.key_averages():
        buckets[categorize(event.key)] += event.self_cpu_time_total
    total = sum(buckets.values())
    rows = [{"group": k, "ms / step": v / 1e3 / args.steps, "share": f"{100 * v / total:.1f}%"}
            for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])]
    print(table(rows, ["group", "ms / step", "share"]))
    print("\ntop operators:")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(table([{"operator": e.key, "calls": e.count, "self ms / step": e.self_cpu_time_total / 1e3 / args.steps}
                 for e in top], ["operator", "calls", "self ms / step"]))

    flops = training_flops_per_image()
    achieved = rate * flops / 1e9
    peak = gemm_peak(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"\ntraining FLOPs per image (forward + both backward passes): {flops / 1e6:.1f} MFLOP")
    print(f"throughput without profiler: {rate:,.0f} img/s (with profiler: {rate_profiled:,.0f})")
    print(f"achieved: {achieved:,.1f} GFLOP/s; measured {precision} gemm peak (2048^3, {torch.get_num_threads()} threads): "
          f"{peak:,.1f} GFLOP/s; ratio {achieved / peak:.0%}")


if __name__ == "__main__":
    main()
