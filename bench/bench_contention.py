"""Training throughput on a busy machine: quiet, and with 1 and 2 competing CPU-bound processes.

Exercise net and recipe, batch 32, real CIFAR-10 images. For each load (0, 1, 2 competitors: plain Python
busy loops, started before and killed after each load's measurements), it measures

- cifarlab with a fixed thread count = all cores (the default before adaptive threads; ``--threads N``),
- cifarlab ``--threads 1``,
- cifarlab with adaptive threads (the command line's default now; ``train(adaptive_threads=True)``),
- Keras 3 (fp32; with ``--keras-mixed-bf16`` also mixed_bfloat16) if a Python with TensorFlow is found
  (``--keras-python``, else ``bench/.venv-keras`` as bench_training.py makes it, else this Python);
  otherwise the table says it was skipped.

Each entry is the median images/s over ``--repeats`` runs of ``--steps`` steps after one warm-up run
(a fresh train() call each: adaptive mode pays its probing in every run, about 25 steps of which ~10 at
one thread; over a real 1,563-step epoch that is amortized 5x more than over the default 300 steps).

    python bench/bench_contention.py --data-dir ../shared/cifar-10-batches-bin            # ~12 min on 2 cores
    python bench/bench_contention.py --data-dir ... --steps 20 --repeats 1 --loads 0 1    # smoke check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, table  # noqa: E402

from cifarlab.data import CIFAR10, load_cifar10  # noqa: E402
from cifarlab.train import recipe_from, resolve_precision, train  # noqa: E402

BENCH = Path(__file__).resolve().parent
BUSY_LOOP = "while True: pass"


class Competitors:
    """``n`` CPU-bound Python processes (busy loops) for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0)  # let them get scheduled
        return self

    def __exit__(self, *exc):
        for p in self.procs:  # only the processes started here, by their handles
            p.kill()
        for p in self.procs:
            p.wait()


def cifarlab_rate(data: CIFAR10, steps: int, repeats: int, precision: str, threads: int | None,
                  adaptive: bool) -> float:
    recipe = recipe_from("exercise", epochs=1)
    small = CIFAR10(data.train.subset(slice(0, steps * recipe.batch_size)), data.test.subset(slice(0, 100)),
                    data.classes)
    before = torch.get_num_threads()
    rates = []
    try:
        if threads:
            torch.set_num_threads(threads)
        for _ in range(repeats + 1):  # the first run warms up allocators and kernels
            with tempfile.TemporaryDirectory() as tmp:
                result = train(recipe, small, Path(tmp) / "run", progress=False, log=lambda *a: None,
                               precision=precision, adaptive_threads=adaptive)
            rates.append(result.history[0]["images_per_s"])
    finally:
        torch.set_num_threads(before)
    return median(rates[1:])


def find_keras_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [str(BENCH / ".venv-keras" / "bin" / "python"), sys.executable]
    for python in candidates:
        if python and Path(python).exists():
            ok = subprocess.run([python, "-c", "import tensorflow, keras"], capture_output=True).returncode == 0
            if ok:
                return python
    return None


def keras_rate(python: str, data_dir: Path, steps: int, repeats: int, mixed_bf16: bool) -> tuple[float, str]:
    cmd = [python, str(BENCH / "keras_exercise.py"), str(data_dir), "--steps", str(steps), "--repeats", str(repeats)]
    if mixed_bf16:
        cmd.append("--mixed-bf16")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["images_per_s"], result["framework"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=300, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="numbers of competing processes")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--keras-python", help="a Python with tensorflow and keras (default: bench/.venv-keras, "
                                           "then this Python)")
    ap.add_argument("--keras-mixed-bf16", action="store_true", help="also Keras with mixed_bfloat16")
    ap.add_argument("--no-keras", action="store_true")
    args = ap.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    cores = torch.get_num_threads()
    precision = resolve_precision(args.precision, torch.device("cpu"))
    keras_python = None if args.no_keras else find_keras_python(args.keras_python)
    header("Training throughput under CPU contention, exercise net and recipe (batch 32)",
           f"images/s of training, median of {args.repeats} runs of {args.steps} steps after one warm-up run, "
           f"with 0/1/2 competing Python busy loops; cifarlab in {precision}, Keras in fp32"
           + (" and mixed_bfloat16" if args.keras_mixed_bf16 else ""))
    if keras_python is None:
        print("Keras: skipped (" + ("--no-keras" if args.no_keras else "no Python with tensorflow and keras found; "
              "make bench/.venv-keras with `python bench/bench_training.py` or pass --keras-python") + ")\n")
    variants = [(f"cifarlab, fixed {cores} threads (default before; --threads {cores})", cores, False),
                ("cifarlab --threads 1", 1, False),
                (f"cifarlab adaptive threads (CLI default now; up to {cores})", None, True)]
    rows = {name: {"implementation": name} for name, *_ in variants}
    keras_rows = {}
    for load in args.loads:
        col = "quiet" if load == 0 else f"{load} busy"
        with Competitors(load):
            for name, threads, adaptive in variants:
                rows[name][col] = cifarlab_rate(data, args.steps, args.repeats, precision, threads, adaptive)
                print(f"  {col:>7}: {name}: {rows[name][col]:,.0f} img/s", flush=True)
            if keras_python:
                for mixed in ([False, True] if args.keras_mixed_bf16 else [False]):
                    rate, framework = keras_rate(keras_python, data.root, args.steps, args.repeats, mixed)
                    keras_rows.setdefault(framework, {"implementation": framework})[col] = rate
                    print(f"  {col:>7}: {framework}: {rate:,.0f} img/s", flush=True)
    all_rows = list(rows.values()) + list(keras_rows.values())
    columns = ["implementation"]
    for load in args.loads:
        col = "quiet" if load == 0 else f"{load} busy"
        columns.append(col)
        if load and 0 in args.loads:
            columns.append(f"{col} % of quiet")
            for r in all_rows:
                r[f"{col} % of quiet"] = f"{100 * r[col] / r['quiet']:.0f}%"
    print()
    print(table(all_rows, columns))
    if keras_rows:
        keras_fp32 = next(r for name, r in keras_rows.items() if "mixed" not in name)
        adaptive = rows[variants[2][0]]
        print("\nadaptive cifarlab / Keras fp32 under the same load: " + ", ".join(
            f"{'quiet' if load == 0 else f'{load} busy'} {adaptive[c] / keras_fp32[c]:.2f}x"
            for load in args.loads for c in ["quiet" if load == 0 else f"{load} busy"]))
    print(f"\n(os.cpu_count() = {os.cpu_count()}, torch threads at start = {cores}, precision {precision})")


if __name__ == "__main__":
    main()
