"""One precision context for training and evaluation (as nanoGPT keeps one ``ctx``).

``fp32`` everywhere, or ``bf16`` autocast: convolutions and matrix multiplies in bf16 while weights,
optimizer state and the loss stay fp32, so no gradient scaler is needed. ``auto`` picks bf16 where the
hardware does it natively (CUDA; CPUs with AVX512-BF16 or AMX) for training; evaluation on a CPU stays
fp32 by default, so reported accuracies are the fp32 model's.
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device, training: bool = True) -> str:
    """"auto" -> the precision to use on ``device``; "fp32"/"bf16" stay as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and training:
        # Native bf16 dot products (AVX512-BF16, AMX) run the convolutions ~2x faster than fp32 (bench/);
        # without them oneDNN emulates bf16 and fp32 is the faster choice.
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The context every forward pass runs in, for training and evaluation alike."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
