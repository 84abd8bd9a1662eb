"""Seconds per epoch of the deeper nets (resnet18, airbench96) on this machine, and a shortened training.

Per-epoch time is estimated from --steps timed training steps after --warmup untimed ones, each step
what cifarlab's trainer does (cifarlab.train.Trainer.train_step): a batch of real CIFAR-10 images normalized and
augmented as the recipe says, channels-last on CPU, forward under the precision context (``auto``: bf16
autocast on CPUs with native bf16, as the trainer picks), cross-entropy with the recipe's label
smoothing, backward, the recipe's optimizer step. Seconds per epoch = median seconds per step x steps
per epoch (50,000 images / batch, the last partial batch counted whole). Evaluation is not included.

Recipes: airbench96 is its preset (batch 1024); resnet18 has no preset of its own, so it runs the
``fast`` preset's recipe (Nesterov SGD one-cycle, label smoothing, flip + translate; batch 256) with
``--model resnet18``. ``--batch-size`` overrides both, scaling the lr with it (see ``recipe_for``).

    python bench/bench_deep.py --data-dir ../shared/cifar-10-batches-bin                     # s/epoch
    python bench/bench_deep.py --data-dir ... --models resnet18 --steps 10 --warmup 3
    python bench/bench_deep.py --data-dir ... --train --epochs 1 --train-subset 5000         # + accuracy

``--train`` then runs cifarlab's real train() for --epochs on the first --train-subset training images
and reports the test accuracy (on --test-subset test images, default all 10,000; the recipe's TTA level
at the last epoch) and the wall time of the whole run, with the command that reproduces it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, median, table  # noqa: E402

from cifarlab.data import CIFAR10, load_cifar10  # noqa: E402
from cifarlab.models import Whiten, build_model  # noqa: E402
from cifarlab.precision import autocast  # noqa: E402
from cifarlab.train import make_optimizer, recipe_from, resolve_precision, train  # noqa: E402
from cifarlab.transforms import Augment, Normalization, alternating_flips  # noqa: E402

RECIPES = {"resnet18": ("fast", {"model": "resnet18"}), "airbench96": ("airbench96", {})}
TRAIN_IMAGES = 50_000


def recipe_for(model: str, batch_size: int | None = None, **overrides):
    """The model's recipe; another batch size scales the lr linearly (airbench states its lr per 1024
    images; our loss is a mean, so the recipe's lr at a batch of b images is lr x b / its batch). The
    recipes' weight decay is per unit of lr, so the decay per step follows."""
    preset, base = RECIPES[model]
    if batch_size:
        recipe = recipe_from(preset, **base)
        overrides.update(batch_size=batch_size, lr=recipe.lr * batch_size / recipe.batch_size)
    return preset, recipe_from(preset, **base, **overrides)


def seconds_per_step(data: CIFAR10, model_name: str, steps: int, warmup: int, precision: str,
                     batch_size: int | None) -> dict:
    preset, recipe = recipe_for(model_name, batch_size)
    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, data.num_classes, data.image_shape)
    norm = Normalization.for_training(recipe.normalization, data.train.images)
    if any(isinstance(m, Whiten) for m in model.modules()):
        model.init_from_data(norm(data.train.images[:5000]))
    model.to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(recipe, model)
    augment = Augment(recipe.flip, recipe.translate, recipe.cutout, recipe.translate_pad)
    flips = alternating_flips(recipe.seed, len(data.train), 0) if recipe.flip and recipe.alt_flip else None
    ctx = autocast(device, precision)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        idx = order[(step * recipe.batch_size) % len(order):][:recipe.batch_size]
        x = norm(data.train.images[idx])
        if augment.active:
            x = augment(x, flip_mask=None if flips is None else flips[idx])
        x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), data.train.labels[idx], label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    per_step = median(times)
    spe = math.ceil(TRAIN_IMAGES / recipe.batch_size)
    return {"model": model_name, "recipe": preset, "params": f"{model.num_parameters():,}", "precision": precision,
            "threads": torch.get_num_threads(), "batch": recipe.batch_size, "timed steps": steps,
            "s/step (median)": per_step, "min s/step": min(times), "steps/epoch": spe,
            "s/epoch (est.)": per_step * spe}


def short_training(data: CIFAR10, model_name: str, epochs: int, train_subset: int, test_subset: int,
                   precision: str, batch_size: int | None, command: str) -> dict:
    preset, recipe = recipe_for(model_name, batch_size, epochs=epochs)
    subset = CIFAR10(data.train.subset(slice(0, train_subset)), data.test.subset(slice(0, test_subset)), data.classes)
    started = time.perf_counter()
    result = train(recipe, subset, Path(f"/tmp/cifarlab-bench-deep/{model_name}"), progress=False,
                   log=lambda *a, **k: None, precision=precision)
    last = result.history[-1]
    return {"model": model_name, "recipe": preset, "epochs": epochs, "batch": recipe.batch_size, "lr": recipe.lr,
            "train images": train_subset, "test images": test_subset,
            "test accuracy": f"{100 * last['val_acc']:.2f}%", "train loss": last["train_loss"],
            "wall s": time.perf_counter() - started, "command": command}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", help="cifar-10-batches-bin (default: $CIFARLAB_DATA or the cache)")
    ap.add_argument("--models", nargs="+", choices=sorted(RECIPES), default=["resnet18", "airbench96"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--batch-size", type=int, help="override the recipes' batch size")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--train", action="store_true", help="also run a shortened training and report accuracy")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--test-subset", type=int, default=10_000)
    ap.add_argument("--no-timing", action="store_true", help="only the shortened training")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, download=False)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    header("deep nets on CPU: seconds per epoch (training steps only) and a shortened training",
           f"precision {args.precision} -> {precision} (bf16 = autocast: bf16 convs/matmuls, fp32 weights), "
           f"channels-last, {torch.get_num_threads()} threads")
    if not args.no_timing:
        rows = []
        for name in args.models:
            rows.append(seconds_per_step(data, name, args.steps, args.warmup, args.precision, args.batch_size))
            print(f"  {name}: {rows[-1]['s/step (median)']:.2f} s/step", flush=True)
        print()
        print(table(rows, list(rows[0])))
        print()
    if args.train:
        rows = []
        for name in args.models:
            command = (f"python bench/bench_deep.py --no-timing --train --models {name} --epochs {args.epochs} "
                       f"--train-subset {args.train_subset} --test-subset {args.test_subset} "
                       f"--precision {args.precision}" + (f" --batch-size {args.batch_size}" if args.batch_size else ""))
            rows.append(short_training(data, name, args.epochs, args.train_subset, args.test_subset,
                                       args.precision, args.batch_size, command))
            print(f"  {name}: {rows[-1]['test accuracy']} in {rows[-1]['wall s']:.0f} s", flush=True)
        print()
        print(table(rows, [c for c in rows[0] if c != "command"]))
        for row in rows:
            print(f"# {row['model']}: {row['command']}")


if __name__ == "__main__":
    main()
