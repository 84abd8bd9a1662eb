"""``--device``: a name PyTorch knows and a device this machine has, or a one-line error saying which
devices there are ("cuda" on a CPU-only build of PyTorch, "cuda:3" with two GPUs, "nonsense")."""
from __future__ import annotations

import torch

from .errors import CifarlabError, short_repr

SUPPORTED = ("cpu", "cuda", "mps")


class DeviceError(CifarlabError):
    """A device that does not exist here."""


def available() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name, option: str = "--device") -> torch.device:
    """A torch.device that exists on this machine; None/"" means the default (cuda if available)."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(str(name))
        except (RuntimeError, ValueError, TypeError):
            raise DeviceError(f"{option} {short_repr(name, 40)}: not a device name; available here: "
                              f"{', '.join(available())}.") from None
    shown = f"{option} {device}"
    if device.type == "cpu":
        return device
    if device.type not in SUPPORTED:
        raise DeviceError(f"{shown}: cifarlab runs on {', '.join(SUPPORTED)}; available here: {', '.join(available())}.")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceError(f"{shown}: this PyTorch ({torch.__version__}) is a CPU-only build without CUDA; "
                              f"available here: {', '.join(available())}.")
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(f"{shown}: no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES); "
                              f"available here: {', '.join(available())}.")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{shown}: there {'is' if count == 1 else 'are'} {count} CUDA GPU{'s' * (count > 1)} "
                              f"here; available: {', '.join(available())}.")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{shown}: Apple's MPS is not available here; available: {', '.join(available())}.")
    return device
