"""Training throughput side by side, in one run, on one machine: cifarlab vs a plain PyTorch loop vs Keras 3.

All three train the exercise's network with the exercise's recipe (batch 32, Adamax 5e-3, x/255 - 0.5)
on the same real CIFAR-10 images, for --steps steps per repeat; the table shows the median images/s over
--repeats and the ratio to Keras. Keras runs in its own virtual environment (bench/.venv-keras, created
on first use with `pip install tensorflow-cpu`), never as a cifarlab dependency.

    python bench/bench_training.py --data-dir ../shared/cifar-10-batches-bin [--steps 300] [--repeats 3]
    python bench/bench_training.py ... --presets        # also the fast / airbench94 presets (train + eval img/s)
    python bench/bench_training.py ... --paired 5       # equal precision only, Keras and cifarlab interleaved
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, table  # noqa: E402

from cifarlab.data import CIFAR10, load_cifar10  # noqa: E402
from cifarlab.evaluate import TTA_LEVELS, predict_logits  # noqa: E402
from cifarlab.train import recipe_from, resolve_precision, train  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402

BENCH = Path(__file__).resolve().parent
KERAS_VENV = BENCH / ".venv-keras"
KERAS_SPEC = "tensorflow-cpu==2.21.0"


# ---------------------------------------------------------------------------------------------------
# cifarlab: the real training loop (train()), timed by the loop itself (evaluation excluded)


def cifarlab_rate(data: CIFAR10, preset: str, steps: int, repeats: int, train_kwargs: dict | None = None,
                  **overrides) -> float:
    recipe = recipe_from(preset, epochs=1, **overrides)
    n = steps * recipe.batch_size
    small = CIFAR10(data.train.subset(slice(0, n)), data.test.subset(slice(0, 100)), data.classes)
    rates = []
    for _ in range(repeats + 1):  # the first repeat warms up allocators and kernels
        with tempfile.TemporaryDirectory() as tmp:  # a new run never writes into an existing folder
            result = train(recipe, small, Path(tmp) / "run", progress=False, log=lambda *a: None,
                           **(train_kwargs or {}))
        rates.append(result.history[0]["images_per_s"])
    return median(rates[1:])


@contextlib.contextmanager
def per_parameter_optimizer():
    """cifarlab as before issue 13: PyTorch's per-parameter optimizer loop instead of foreach (same steps)."""
    T = importlib.import_module("cifarlab.train")  # (the package's `train` attribute is the function)
    original = T.make_optimizer
    T.make_optimizer = functools.partial(original, foreach=False)
    try:
        yield
    finally:
        T.make_optimizer = original


def eval_rate(data: CIFAR10, preset: str, repeats: int) -> float:
    from cifarlab.models import build_model

    recipe = recipe_from(preset)
    model = build_model(recipe.model).to(memory_format=torch.channels_last)
    norm = Normalization.named(recipe.normalization)
    images = data.test.images[:2000]  # airbench94's TTA takes six passes per image: 2,000 are plenty to time
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        predict_logits(model, images, norm, tta=recipe.tta)
        times.append(time.perf_counter() - start)
    return len(images) / median(times[1:])


def two_process_rate(data_dir: Path, steps: int, repeats: int, precision: str) -> float:
    """cifarlab under torchrun: 2 processes x 1 thread, batch 16 each (global batch 32), gloo all-reduce.

    The idea (issue 13): no OpenMP barrier is crossed per op; the price is a 4.3 MB gradient all-reduce
    per step over loopback. Read from the run's metrics.csv (images/s summed over both processes)."""
    import csv
    import os

    rates = []
    for _ in range(repeats + 1):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "cifarlab", "train", "--preset", "exercise", "--epochs", "1", "--batch-size", "16",
                   "--threads", "1", "--train-subset", str(steps * 32), "--data-dir", str(data_dir),
                   "--no-download", "--no-progress", "--precision", precision, "--runs-dir", tmp, "--name", "r"]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            with open(Path(tmp) / "r" / "metrics.csv") as f:
                rates.append(float(next(csv.DictReader(f))["images_per_s"]))
    return median(rates[1:])


# ---------------------------------------------------------------------------------------------------
# A plain PyTorch eager loop in the style of the official CIFAR-10 tutorial: a Dataset returning one
# normalized image at a time, a DataLoader, an nn.Module with the layers as attributes, NCHW, default init.


class TutorialNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(0.25), nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.drop1(self.pool(F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.1)), 0.1)))
        x = self.drop2(self.pool(F.leaky_relu(self.conv4(F.leaky_relu(self.conv3(x), 0.1)), 0.1)))
        x = self.drop3(F.leaky_relu(self.fc1(torch.flatten(x, 1)), 0.1))
        return self.fc2(x)


class TutorialDataset(torch.utils.data.Dataset):
    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images_hwc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):  # like ToTensor() + Normalize((0.5,)*3, (1,)*3): one image at a time
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(255).sub(0.5)
        return x, int(self.labels[i])


def plain_pytorch_rate(data: CIFAR10, steps: int, repeats: int) -> float:
    n = steps * 32
    images = data.train.images[:n].permute(0, 2, 3, 1).numpy()
    labels = data.train.labels[:n].numpy()
    loader = torch.utils.data.DataLoader(TutorialDataset(images, labels), batch_size=32, shuffle=True)
    net = TutorialNet()
    optimizer = torch.optim.Adamax(net.parameters(), lr=5e-3)
    criterion = nn.CrossEntropyLoss()
    rates = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), targets)
            loss.backward()
            optimizer.step()
        rates.append(n / (time.perf_counter() - start))
    return median(rates[1:])


# ---------------------------------------------------------------------------------------------------
# Keras 3 / TensorFlow CPU, in its own environment


def ensure_keras_venv() -> Path:
    python = KERAS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {KERAS_VENV} with {KERAS_SPEC} (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(KERAS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", KERAS_SPEC], check=True)
    return python


def keras_run(data_dir: Path, *args: str) -> dict:
    python = ensure_keras_venv()
    proc = subprocess.run([str(python), str(BENCH / "keras_exercise.py"), str(data_dir), *args],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=300, help="training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-keras", action="store_true")
    ap.add_argument("--presets", action="store_true", help="also measure the fast and airbench94 presets")
    ap.add_argument("--variants", action="store_true", help="also Keras mixed_bfloat16, cifarlab with the "
                    "per-parameter optimizer loop, with NCHW and with torch.compile")
    ap.add_argument("--only-presets", action="store_true", help="just the presets table")
    ap.add_argument("--paired", type=int, metavar="ROUNDS",
                    help="just the equal-precision comparison: ROUNDS rounds, each timing Keras fp32, cifarlab fp32, "
                         "Keras mixed_bfloat16 and cifarlab bf16 back to back (--repeats runs each); the ratios are "
                         "taken within each round, so a machine that drifts between rounds does not bias them")
    args = ap.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    if args.paired:
        return compare_paired(data, args)
    if not args.only_presets:
        compare_exercise(data, args)
    if args.presets or args.only_presets:
        compare_presets(data, args)


def compare_exercise(data: CIFAR10, args) -> None:
    header("Training throughput, exercise net and recipe (batch 32)",
           f"images/s of training, median of {args.repeats} repeats of {args.steps} steps after one warm-up; "
           f"evaluation excluded")
    rows = []
    steps = ("--steps", str(args.steps), "--repeats", str(args.repeats))
    if not args.no_keras:
        k = keras_run(data.root, *steps)
        rows.append({"implementation": k["framework"] + " (CPU)", "train img/s": k["images_per_s"]})
    rows.append({"implementation": "plain PyTorch eager (tutorial style, NCHW, DataLoader)",
                 "train img/s": plain_pytorch_rate(data, args.steps, args.repeats)})
    precision = resolve_precision("auto", torch.device("cpu"))
    rows.append({"implementation": f"cifarlab --preset exercise (channels_last, {precision})",
                 "train img/s": cifarlab_rate(data, "exercise", args.steps, args.repeats)})
    if precision != "fp32":
        rows.append({"implementation": "cifarlab --precision fp32",
                     "train img/s": cifarlab_rate(data, "exercise", args.steps, args.repeats, {"precision": "fp32"})})
    if args.variants and not args.no_keras:
        k = keras_run(data.root, *steps, "--mixed-bf16")
        rows.append({"implementation": k["framework"] + " (CPU)", "train img/s": k["images_per_s"]})
    if args.variants:
        with per_parameter_optimizer():
            rows.append({"implementation": f"cifarlab {precision}, per-parameter optimizer loop (foreach off, as "
                                           f"before issue 13)",
                         "train img/s": cifarlab_rate(data, "exercise", args.steps, args.repeats)})
        rows.append({"implementation": "cifarlab, NCHW instead of channels_last",
                     "train img/s": cifarlab_rate(data, "exercise", args.steps, args.repeats,
                                                  {"channels_last": False})})
        rows.append({"implementation": "cifarlab fp32, torchrun 2 processes x 1 thread, batch 16 each (gloo)",
                     "train img/s": two_process_rate(data.root, args.steps, args.repeats, "fp32")})
        rows.append({"implementation": "cifarlab --compile (torch.compile)",
                     "train img/s": cifarlab_rate(data, "exercise", args.steps, args.repeats, {"compile": True})})
    base = rows[0]["train img/s"]
    for r in rows:
        r["vs first row"] = f"{r['train img/s'] / base:.2f}x"
        r["s/epoch (50k)"] = 50_000 / r["train img/s"]
    print(table(rows, ["implementation", "train img/s", "s/epoch (50k)", "vs first row"]))


def compare_paired(data: CIFAR10, args) -> None:
    header("Equal precision, paired: cifarlab vs Keras 3, exercise net and recipe (batch 32)",
           f"images/s of training; {args.paired} rounds, each: Keras fp32, cifarlab fp32, Keras mixed_bfloat16, "
           f"cifarlab bf16 autocast, each the median of {args.repeats} runs of {args.steps} steps after a warm-up "
           f"run; ratio = cifarlab / Keras within the round")
    steps = ("--steps", str(args.steps), "--repeats", str(args.repeats))
    rows = []
    for r in range(args.paired):
        row = {"round": r + 1}
        row["Keras fp32"] = keras_run(data.root, *steps)["images_per_s"]
        row["cifarlab fp32"] = cifarlab_rate(data, "exercise", args.steps, args.repeats, {"precision": "fp32"})
        row["Keras bf16"] = keras_run(data.root, *steps, "--mixed-bf16")["images_per_s"]
        row["cifarlab bf16"] = cifarlab_rate(data, "exercise", args.steps, args.repeats, {"precision": "bf16"})
        row["fp32 ratio"] = row["cifarlab fp32"] / row["Keras fp32"]
        row["bf16 ratio"] = row["cifarlab bf16"] / row["Keras bf16"]
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    columns = ["round", "Keras fp32", "cifarlab fp32", "fp32 ratio", "Keras bf16", "cifarlab bf16", "bf16 ratio"]
    med = {"round": "median", **{c: median([r[c] for r in rows]) for c in columns[1:]}}
    for r in rows + [med]:
        for c in ("fp32 ratio", "bf16 ratio"):
            r[c] = f"{r[c]:.2f}x"
    print()
    print(table(rows + [med], columns))


def compare_presets(data: CIFAR10, args) -> None:
    print()
    header("cifarlab presets", "train img/s (median, as above; batch = the preset's; --steps images' worth of "
           "batches; default precision) and eval img/s on 2,000 test images (fp32, with the preset's TTA)")
    rows = []
    for preset in ("exercise", "fast", "airbench94"):
        batch = recipe_from(preset).batch_size
        rows.append({"preset": preset, "batch": batch,
                     "train img/s": cifarlab_rate(data, preset, max(4, args.steps * 32 // batch), args.repeats),
                     "eval img/s": eval_rate(data, preset, args.repeats)})
    for r in rows:
        r["TTA"] = TTA_LEVELS[recipe_from(r["preset"]).tta]
    print(table(rows, ["preset", "batch", "train img/s", "eval img/s", "TTA"]))


if __name__ == "__main__":
    main()
