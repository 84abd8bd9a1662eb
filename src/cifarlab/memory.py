"""How much memory a model needs for a batch, worked out before anything real is allocated.

A declaration can be small on disk and huge in memory: 8,192 1x1 filters followed by 400 activation
layers is 114,698 parameters, but every layer keeps a (8192, 32, 32) activation per image for the
backward pass, about 13 GiB per image. :func:`estimate` builds the model on PyTorch's ``meta`` device
(shapes only, no storage) and runs one forward pass there to get every layer's output size;
:func:`check_fits` refuses a run, with the number, when the estimate exceeds the memory available.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import CifarlabError

BYTES = 4  # fp32 activations (bf16 autocast keeps fp32 copies too; counted conservatively)


class MemoryBudgetError(CifarlabError):
    """The model and batch size would need more memory than the device has."""


@dataclass
class Estimate:
    batch_size: int
    params: int
    values_per_image: int          # every layer's output, summed: what training keeps for backward
    largest_per_image: int         # the largest single layer output (inference peak is about twice this)
    largest_layer: str
    training_bytes: int
    inference_bytes: int


def _input_shape(declaration: dict) -> tuple:
    from . import models

    shape = declaration.get("input_shape") if isinstance(declaration, dict) else None
    return tuple(shape) if shape else tuple(getattr(models, "INPUT_SHAPE", (3, 32, 32)))


def estimate(declaration: dict, batch_size: int, optimizer_slots: int = 3) -> Estimate:
    """Memory for a training step and an inference batch of ``batch_size`` (see the module docstring).

    ``optimizer_slots``: tensors kept per parameter besides the weights (gradient, two moments)."""
    from .models import Net

    with torch.device("meta"):
        model = Net(declaration)
    outputs: list[tuple[str, int]] = []
    hooks = [module.register_forward_hook(
        lambda m, i, o, name=name: outputs.append((name, o[0].numel() if o.ndim else 1)))
        for name, module in model.named_modules() if name]  # every layer, inside residual blocks too
    try:
        with torch.no_grad():
            model.eval()(torch.empty((1, *_input_shape(model.declaration)), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    per_image = sum(n for _, n in outputs) + int(torch.Size(_input_shape(model.declaration)).numel())
    largest_layer, largest = max(outputs, key=lambda t: t[1]) if outputs else ("input", per_image)
    return Estimate(batch_size=batch_size, params=params, values_per_image=per_image,
                    largest_per_image=largest, largest_layer=largest_layer,
                    training_bytes=BYTES * (params * (1 + optimizer_slots) + batch_size * per_image),
                    inference_bytes=BYTES * (params + 2 * batch_size * largest))


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes available, where) for a device: free GPU memory, or the machine's available memory (and the
    cgroup limit, whichever is smaller). None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        except Exception:
            return None, str(device)
    if device.type != "cpu":
        return None, str(device)
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            found.append(int(text))
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None, "memory"
    return min(found), "available memory"


def human(n: float) -> str:
    for unit, scale in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} bytes"


def check_fits(declaration: dict, batch_size: int, device, training: bool = True,
               available: int | None = None) -> Estimate:
    """Refuse (MemoryBudgetError, with the numbers) a model and batch size that cannot fit in memory."""
    est = estimate(declaration, batch_size)
    where = "available"
    if available is None:
        available, where = available_bytes(device)
    need = est.training_bytes if training else est.inference_bytes
    if available is not None and need > available:
        name = declaration.get("name", "custom") if isinstance(declaration, dict) else "custom"
        what = "training" if training else "inference"
        per_image = (est.training_bytes - BYTES * est.params * 4) / batch_size if training \
            else (est.inference_bytes - BYTES * est.params) / batch_size
        fixed = need - per_image * batch_size
        fits = int((available - fixed) // per_image) if per_image > 0 and available > fixed else 0
        raise MemoryBudgetError(
            f"model {name!r} with batch size {batch_size} needs about {human(need)} for {what} "
            f"({est.values_per_image:,} activation values per image; the largest layer, {est.largest_layer!r}, "
            f"outputs {est.largest_per_image:,}), more than the {human(available)} {where} on {device}. "
            + (f"Use a smaller --batch-size (about {fits}) or a smaller model." if fits >= 1
               else "Even batch size 1 would not fit: use a smaller model."))
    return est
