"""Muon (Keller Jordan): orthogonalized momentum for conv filters, Nesterov SGD for everything else.

What airbench94_muon (github.com/KellerJordan/cifar10-airbench, ``airbench94_muon.py``) does, re-expressed
here (no code copied):

- every conv filter bank (a 4-D trainable weight, O x I x k x k) keeps a momentum buffer
  ``buf = momentum * buf + grad``; the direction is ``grad + momentum * buf`` (Nesterov) or ``buf``;
- before each step the filter bank is rescaled to Frobenius norm sqrt(O) (a fixed weight norm, so the
  lr is a fixed angular step and no weight decay is needed);
- the direction, reshaped to an O x (I k k) matrix, is replaced by an approximately orthogonal matrix of the
  same row and column spaces: a few iterations of a quintic Newton-Schulz map
  ``X <- a X + (b X X^T + c (X X^T)^2) X`` with (a, b, c) = (3.4445, -4.7750, 2.0315), in bf16, started
  from the direction divided by its Frobenius norm. These coefficients trade exact convergence for speed:
  after 3 iterations the singular values lie roughly in 0.5..1.5 instead of all at 1 (airbench's note:
  that does not hurt);
- the filter moves by ``-lr`` times that matrix;
- every other parameter (biases, BatchNorm shifts, the dense head) takes a plain SGD step with momentum
  and weight decay (PyTorch's ``torch.optim.SGD`` semantics, dampening 0).

One optimizer class holds both kinds of groups (``orthogonalize`` True/False), so the training loop's
learning-rate schedule (``lr_scale`` per group), checkpoints (the ``momentum_buffer`` tensors) and
gradient scaler see a single optimizer.
"""
from __future__ import annotations

import math

import torch

# The quintic iteration's coefficients (airbench94_muon / Muon): chosen to maximize the slope at zero.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3  # airbench94_muon's count (the Muon repository's default is 5)


def orthogonalize(matrix: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximately orthogonal matrix with ``matrix``'s singular vectors (U S' V^T, S' near 1), by
    ``steps`` quintic Newton-Schulz iterations computed in ``dtype``. Returned in ``dtype``."""
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize takes a matrix, not a tensor of shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + eps)  # largest singular value <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Muon for the groups with ``orthogonalize=True``, SGD (momentum, Nesterov, weight decay) for the rest.

    Group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (SGD groups only), ``orthogonalize``,
    ``normalize`` (Muon groups: rescale each filter bank to norm sqrt(out channels) before the step) and
    ``ns_steps``. State per parameter: ``momentum_buffer``.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, orthogonalize: bool = True, normalize: bool = True,
                 ns_steps: int = NS_STEPS):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight decay must be >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      orthogonalize=orthogonalize, normalize=normalize, ns_steps=ns_steps))
        for group in self.param_groups:
            if group["orthogonalize"] and group["weight_decay"]:
                raise ValueError("Muon groups take no weight decay (their weights are renormalized instead)")
            if group["orthogonalize"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups hold matrices or conv filters only; put vectors in an SGD group")

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            if group["orthogonalize"]:
                for p in params:
                    buf = self._buffer(p)
                    buf.mul_(momentum).add_(p.grad)
                    direction = p.grad.add(buf, alpha=momentum) if nesterov else buf
                    if group["normalize"]:
                        p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(1e-30))
                    update = orthogonalize(direction.reshape(p.shape[0], -1), group["ns_steps"])
                    p.add_(update.view(p.shape).to(p.dtype), alpha=-lr)
            else:
                bufs = [self._buffer(p) for p in params]
                grads = [p.grad for p in params]
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                directions = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
                torch._foreach_add_(params, directions, alpha=-lr)
        return loss


def muon_groups(recipe, model: torch.nn.Module) -> list[dict]:
    """airbench94_muon's split: conv filter banks (4-D trainable weights) -> Muon at ``muon_lr``; dense
    weights -> SGD at ``lr``; BatchNorm parameters, the whitening bias and other biases -> SGD at
    ``lr x bn_lr_scale`` (airbench94_muon gives all of them its bias lr); with ``whiten_bias_decay`` the
    whitening bias in a group of its own whose lr reaches 0 after ``whiten_bias_epochs``. ``weight_decay`` applies to the
    SGD groups; with ``decay_all`` the bias group's decay is divided by its lr scale (every parameter
    shrinks by the same factor per step, as airbench's ``wd / lr``), else biases do not decay.
    Each group's ``lr_scale`` is its lr relative to ``recipe.lr`` (the schedule multiplies all of them)."""
    from .models import Whiten

    trainable = [p for p in model.parameters() if p.requires_grad]
    whiten = {id(m.bias) for m in model.modules() if isinstance(m, Whiten)} if recipe.whiten_bias_decay else set()
    filters = [p for p in trainable if p.ndim == 4]
    dense = [p for p in trainable if p.ndim in (2, 3)]
    vectors = [p for p in trainable if p.ndim <= 1 and id(p) not in whiten]
    whiten_biases = [p for p in trainable if id(p) in whiten]
    wd = recipe.weight_decay
    bias_decay = wd / recipe.bn_lr_scale if recipe.decay_all else 0.0
    groups = [
        {"params": filters, "lr_scale": recipe.muon_lr / recipe.lr, "momentum": recipe.muon_momentum,
         "nesterov": True, "weight_decay": 0.0, "orthogonalize": True},
        {"params": dense, "lr_scale": 1.0, "momentum": recipe.momentum, "nesterov": recipe.nesterov,
         "weight_decay": wd, "orthogonalize": False},
        {"params": vectors, "lr_scale": recipe.bn_lr_scale, "momentum": recipe.momentum,
         "nesterov": recipe.nesterov, "weight_decay": bias_decay, "orthogonalize": False},
        # whiten_bias_decay: the whitening bias as the other biases, but its lr falls linearly from the
        # peak to 0 at the end of its whiten_bias_epochs (train._set_lr reads zero_at)
        {"params": whiten_biases, "lr_scale": recipe.bn_lr_scale, "momentum": recipe.momentum,
         "nesterov": recipe.nesterov, "weight_decay": bias_decay, "orthogonalize": False,
         "zero_at": recipe.whiten_bias_epochs / recipe.epochs},
    ]
    for g in groups:
        g["lr"] = g["peak_lr"] = recipe.lr * g["lr_scale"]
    return [g for g in groups if g["params"]]


def make_muon(recipe, model: torch.nn.Module) -> Muon:
    return Muon(muon_groups(recipe, model), lr=recipe.lr)
