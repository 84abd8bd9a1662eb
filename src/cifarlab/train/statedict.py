"""Checking a callback's saved state before it is used: each value must be what it replaces."""
from __future__ import annotations

import math

import torch


def checked_tensor(state: dict, name: str, like: torch.Tensor) -> torch.Tensor:
    """``state[name]`` if it is a tensor of ``like``'s shape and dtype (KeyError/ValueError say what is wrong)."""
    value = state[name]
    if not isinstance(value, torch.Tensor) or value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"{name}: expected {str(like.dtype).replace('torch.', '')} {tuple(like.shape)}, got "
                         f"{str(getattr(value, 'dtype', type(value).__name__)).replace('torch.', '')} "
                         f"{tuple(getattr(value, 'shape', ()))}")
    return value


def checked_int(state: dict, name: str, lo: int, hi: int) -> int:
    value = state[name]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}, got {value!r:.60}")
    return value


def checked_float(state: dict, name: str, lo: float, hi: float) -> float:
    value = state[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name}: expected a number in {lo:g}..{hi:g}, got {value!r:.60}")
    return float(value)
