"""A plain eager PyTorch yardstick for `cifarlab train --preset fast`: the same net, data, amount of work.

What a careful user would write by hand: read CIFAR-10's binary files with numpy, build the same ``fast``
architecture (cifarlab's declaration -> a plain ``nn.Module``; the architecture is not what is measured),
normalize with the training set's mean and std, train 3 epochs of batch 256 with Nesterov SGD (lr 0.2,
momentum 0.85, weight decay 5e-4) on a one-cycle schedule (15% warm-up), label smoothing 0.2, random flips and
2-pixel translations on whole batches, bf16 autocast on CPU, channels-last, then evaluate the test set once
with flip TTA. No checks of any file, no checkpoints, no run folder, no report. Prints the test accuracy and
the seconds of the whole process (imports included) on its last line, as "yardstick: acc X seconds Y".

    python bench/yardstick_fast.py --data-dir ../shared/cifar-10-batches-bin --threads 2
"""
from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def read_batches(folder: Path, names) -> tuple[torch.Tensor, torch.Tensor]:
    raw = np.concatenate([np.fromfile(folder / n, np.uint8).reshape(-1, 3073) for n in names])
    return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(raw[:, 0].astype(np.int64))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # one shift per batch: cheap, as batch augmentation is


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from cifarlab.models import build_model  # the same architecture; everything else is plain torch

    x_train, y_train = read_batches(args.data_dir, [f"data_batch_{i}.bin" for i in range(1, 6)])
    x_test, y_test = read_batches(args.data_dir, ["test_batch.bin"])
    mean = x_train.float().mean((0, 2, 3), keepdim=True) / 255
    std = (x_train.float() / 255).std((0, 2, 3), keepdim=True)
    norm = lambda x: ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)  # noqa: E731
    model = build_model("fast", num_classes=10).to(memory_format=torch.channels_last)
    batch, steps_per_epoch = 256, len(x_train) // 256
    total = args.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.85, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            x = norm(augment(x_train[idx], gen))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(x_test), 1000):
            x = norm(x_test[s:s + 1000])
            logits = model(x).float() + model(x.flip(3)).float()
            correct += int((logits.argmax(1) == y_test[s:s + 1000]).sum())
    print(f"yardstick: acc {correct / len(x_test):.4f} seconds {time.perf_counter() - START:.1f}")


if __name__ == "__main__":
    main()
