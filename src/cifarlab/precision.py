"""One precision context for training and evaluation (as nanoGPT keeps one ``ctx``).

``fp32`` everywhere; ``bf16`` autocast: convolutions and matrix multiplies in bf16 while weights,
optimizer state and the loss stay fp32, so no gradient scaler is needed; or ``fp16`` autocast, the same
with float16, whose narrow exponent range needs a gradient scaler in training (:func:`grad_scaler`).

``auto`` picks, for training:

- CUDA, compute capability >= 8.0 (A100, RTX 30xx and later): bf16, which their tensor cores run natively;
- CUDA below 8.0 (T4, V100, Colab's free tier): fp16 with a gradient scaler. These GPUs have fp16 tensor
  cores but no bf16 ones (bf16 would be emulated and slow); airbench itself trains in fp16;
- a CPU with AVX512-BF16 or AMX: bf16; any other CPU: fp32 (emulated bf16 is slower than fp32).

Evaluation uses the same choice on CUDA; on a CPU it stays fp32 by default, so reported accuracies are
the fp32 model's. (The CUDA choices are tested with the capability mocked: no GPU was lent to this
project's sessions.)
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores arrived with Ampere (compute capability 8.0)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def resolve_precision(precision: str, device: torch.device, training: bool = True) -> str:
    """"auto" -> the precision to use on ``device``; "fp32"/"bf16"/"fp16" stay as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    if device.type == "cpu" and training:
        # Native bf16 dot products (AVX512-BF16, AMX) run the convolutions ~2x faster than fp32 (bench/);
        # without them oneDNN emulates bf16 and fp32 is the faster choice.
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The context every forward pass runs in, for training and evaluation alike."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                          enabled=precision in AUTOCAST_DTYPES)


def grad_scaler(device: torch.device, precision: str):
    """A gradient scaler for fp16 training (loss scaled up so small fp16 gradients do not flush to zero,
    steps with inf/NaN gradients skipped); None for fp32 and bf16, which need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
