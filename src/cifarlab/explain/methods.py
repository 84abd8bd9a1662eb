"""Attribution maps for any classifier: which input pixels made the net say this class?

Every method takes a model that returns logits (any architecture), uint8 images (N, C, H, W) of any
size and a normalization (uint8 -> the float input the model was trained on), and returns a float map
(N, H, W) for one class per image: the predicted class by default, or the true class. Gradients are
taken with respect to the *normalized* input (what the model sees); the map has one value per input
pixel (channels reduced as each method says below). Maps are not rescaled: a plot decides its colour
scale, and the faithfulness metrics only use their order.

Methods (``METHODS``; adding one is one entry there):

``saliency``       |d logit / d x|, max over channels (Simonyan et al. 2014). Hand-written: one backward.
``smoothgrad``     Captum ``NoiseTunnel(Saliency(abs=True))``: the mean of the saliency maps of
                   ``samples`` noisy copies (Gaussian, std 15% of the input's value range, as Smilkov
                   et al. 2017 recommend), max over channels. Averaging |grad| (rather than grad, then
                   abs) is the form whose maps Smilkov et al. show; it never cancels opposite signs.
``integrated_gradients``  Captum ``IntegratedGradients``, ``steps`` Gauss-Legendre points, from a
                   baseline image to the input; the map is the sum over channels (signed: by
                   completeness the pixel maps sum to logit(x) - logit(baseline)). Baseline ``"mean"``
                   (the images' mean colour; default) or ``"black"`` (Sundararajan et al.'s choice),
                   both normalized like the input. IG explains the change from its baseline, so it is
                   only faithful under deletion to the same colour: on a briefly trained exercise net
                   (150 test images, deletion to the mean colour) a black baseline scored no better
                   than random (deletion AUC 0.210 vs 0.208) and the mean one best of all (0.134);
                   with deletion to black it was the reverse. The mean matches the default deletion.
``occlusion``      Captum ``Occlusion``: slide a square of the baseline colour (``"mean"`` colour by
                   default: "grey it out" without adding an edge of a colour absent from the data)
                   over the image; a pixel's value is the mean drop of the logit over the windows that
                   cover it (signed). Window ``H // 8`` (4 px on 32x32), sized for the image, and stride
                   = window (non-overlapping: 64 forward passes per 32x32 image). A half-window stride
                   (225 passes) gives smoother maps but took 178 s for 500 images of the exercise net
                   on 2 shared cores: pass ``stride=2`` for it.
``grad_cam``       Grad-CAM (Selvaraju et al. 2017) on a named layer (default: :func:`default_layer`,
                   the last conv layer's or block's output after its activation): ReLU(sum_k mean(dY/dA_k) A_k), upsampled
                   bilinearly to the image size. Hand-written with a forward hook.
``grad_cam_pp``    Grad-CAM++ (Chattopadhyay et al. 2018), the closed form for an exponential of the
                   score: alpha = g^2 / (2 g^2 + sum_ij A g^3), w_k = sum_ij alpha ReLU(g).

Seeds: only SmoothGrad draws random numbers; each batch gets a generator seeded from (seed, batch
index), under ``torch.random.fork_rng`` so the caller's global RNG is untouched. The same seed and batch
size give the same maps.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..net_layers import check_cam_layer, default_cam_layer

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.ELU, nn.Sigmoid)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (dropout off, BatchNorm on its averages) for the duration, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class Context:
    """What a method needs besides the batch; built once per ``attribute`` call."""

    model: nn.Module
    layer: nn.Module | None = None              # Grad-CAM's layer
    baseline_colour: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (1, C, 1, 1) normalized
    value_range: float = 1.0                    # max - min of a normalized pixel (mean over channels)
    seed: int = 0
    batch_index: int = 0
    options: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Methods: (x normalized (B, C, H, W), targets (B,), ctx) -> maps (B, H, W)


def saliency(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    logits = ctx.model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return grad.abs().amax(1)


def smoothgrad(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    from captum.attr import NoiseTunnel, Saliency

    samples = int(ctx.options.get("samples", 16))
    noise = float(ctx.options.get("noise", 0.15)) * ctx.value_range
    with _seeded(ctx.seed, ctx.batch_index):
        attr = NoiseTunnel(Saliency(ctx.model)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=max(1, min(samples, 256 // len(x))),
            stdevs=noise, target=targets, abs=True)
    return attr.detach().amax(1)


def integrated_gradients(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    baseline = ctx.baseline_colour[ctx.options.get("baseline", "mean")].expand_as(x)
    steps = int(ctx.options.get("steps", 32))
    attr = IntegratedGradients(ctx.model).attribute(
        x, baselines=baseline, target=targets, n_steps=steps, internal_batch_size=max(steps, 256))
    return attr.detach().sum(1)


def occlusion(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    from captum.attr import Occlusion

    c, h, w = x.shape[1:]
    window = int(ctx.options.get("window") or max(1, min(h, w) // 8))
    stride = int(ctx.options.get("stride") or window)
    baseline = ctx.baseline_colour[ctx.options.get("baseline", "mean")].expand_as(x)
    attr = Occlusion(ctx.model).attribute(
        x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), baselines=baseline,
        target=targets, perturbations_per_eval=max(1, 256 // len(x)))
    # Captum gives each input value the mean logit drop over the windows that cover it, the same for
    # all channels since a window spans them: the channel mean is that drop, per pixel.
    return attr.detach().mean(1)


def grad_cam(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    acts, grads = _layer_activation_and_grad(ctx, x, targets)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    return _upsample(cam, x.shape[-2:])


def grad_cam_pp(x: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
    acts, grads = _layer_activation_and_grad(ctx, x, targets)
    # With S = exp(Y), the 2nd and 3rd derivatives of S are exp(Y) g^2 and exp(Y) g^3 for a net that is
    # piecewise linear after A; the exp(Y) factors cancel in alpha and only scale the map.
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * F.relu(grads)).sum((2, 3), keepdim=True)
    return _upsample(F.relu((weights * acts).sum(1, keepdim=True)), x.shape[-2:])


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor]] = {
    "saliency": saliency,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "grad_cam": grad_cam,
    "grad_cam_pp": grad_cam_pp,
}
LAYER_METHODS = ("grad_cam", "grad_cam_pp")  # need a layer (default: last_conv_layer)


# ---------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _seeded(seed: int, batch_index: int):
    """Captum's NoiseTunnel draws from the global RNG: seed it for this batch, then put it back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0]))
        yield


def _layer_activation_and_grad(ctx: Context, x: torch.Tensor, targets: torch.Tensor):
    """The layer's output A and d logit_target / dA, from a forward hook that keeps A in the graph."""
    if ctx.layer is None:
        raise ValueError("Grad-CAM needs a layer")
    captured = []
    handle = ctx.layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = ctx.model(x.detach().requires_grad_(True))  # input grad on: A is in the graph
            if not captured or captured[-1].ndim != 4:
                raise ValueError("the Grad-CAM layer must produce a (N, C, H, W) output on this forward pass")
            acts = captured[-1]
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), acts)
    finally:
        handle.remove()
    return acts.detach(), grads.detach()


def _upsample(cam: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"no layer named {layer!r}; conv layers: {', '.join(convs) or 'none'}")
    return modules[layer]


def last_conv_layer(model: nn.Module, sample: torch.Tensor) -> str:
    """Name of the last Conv2d executed on ``sample`` (a normalized batch), or of the activation right
    after it when that is the next module run and keeps the shape: Grad-CAM's usual layer, the last
    spatial features after their non-linearity."""
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append((mod, tuple(o.shape))))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    convs = [i for i, (m, _) in enumerate(order) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no conv layer; Grad-CAM needs one")
    i = convs[-1]
    if i + 1 < len(order) and isinstance(order[i + 1][0], ACTIVATIONS) and order[i + 1][1] == order[i][1]:
        i += 1
    return names[order[i][0]]


def default_layer(model: nn.Module, sample: torch.Tensor) -> str:
    """Grad-CAM's layer when none is named. A cifarlab Net: its last conv layer's or residual block's
    output after the activation that follows it (:func:`cifarlab.net_layers.default_cam_layer`, the rule
    ``visualize`` uses for its stimuli too; past BatchNorm, and a block's output after its skip addition).
    Any other module: :func:`last_conv_layer` found by running ``sample``."""
    if getattr(model, "declaration", None) is not None:
        return default_cam_layer(model)
    return last_conv_layer(model, sample)


def baseline_colours(images: torch.Tensor, normalization) -> dict[str, torch.Tensor]:
    """Normalized (1, C, 1, 1) baseline colours: black, and the mean colour of ``images`` (all of them,
    so a map does not depend on how the images were batched)."""
    mean = mean_colour(images)
    return {"black": normalization(torch.zeros_like(mean)), "mean": normalization(mean)}


def mean_colour(images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-channel mean of uint8 images as (1, C, 1, 1) float in 0..255, summed in chunks (a float64
    copy of 50,000 images would be 1.2 GB)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    for s in range(0, len(images), chunk):
        total += images[s:s + chunk].cpu().sum((0, 2, 3), dtype=torch.float64)
    count = max(1, len(images) * images.shape[2] * images.shape[3])
    return (total / count).float().view(1, -1, 1, 1)


def _value_range(images: torch.Tensor, normalization) -> float:
    """Mean over channels of (normalized 255 - normalized 0): the span of an input pixel."""
    c = images.shape[1]
    lo = normalization(torch.zeros(1, c, 1, 1))
    hi = normalization(torch.full((1, c, 1, 1), 255.0))
    return float((hi - lo).abs().mean())


def predicted_classes(model: nn.Module, images: torch.Tensor, normalization, batch_size: int = 256) -> torch.Tensor:
    device = _device(model)
    out = []
    with evaluating(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(normalization(images[start:start + batch_size].to(device))).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_targets(model, images, normalization, target="predicted", labels=None) -> torch.Tensor:
    """``"predicted"``, ``"true"`` (needs labels) or explicit class indices -> int64 (N,)."""
    if isinstance(target, str):
        if target == "predicted":
            return predicted_classes(model, images, normalization)
        if target == "true":
            if labels is None:
                raise ValueError("target='true' needs labels")
            return torch.as_tensor(labels).long().cpu()
        raise ValueError(f"target must be 'predicted', 'true' or class indices, got {target!r}")
    t = torch.as_tensor(target).long().cpu()
    return t.expand(len(images)).clone() if t.ndim == 0 else t


# ---------------------------------------------------------------------------------------------------
# The entry point


@dataclass
class Attribution:
    method: str
    maps: torch.Tensor        # float32 (N, H, W), on CPU
    targets: torch.Tensor     # int64 (N,): the class each map explains
    seconds: float
    layer: str | None = None  # Grad-CAM's layer name


def attribute(method: str, model: nn.Module, images: torch.Tensor, normalization, target="predicted",
              labels=None, layer: nn.Module | str | None = None, batch_size: int = 32, seed: int = 0,
              reference: torch.Tensor | None = None, **options) -> Attribution:
    """Maps of one method for uint8 ``images`` (N, C, H, W), in batches, in eval mode (restored after).

    ``target``: "predicted", "true" (with ``labels``) or class indices. ``layer``: for Grad-CAM(++), a
    module or a name from ``model.named_modules()`` (default :func:`last_conv_layer`). ``options`` go to
    the method: smoothgrad ``samples`` (16), ``noise`` (0.15); integrated_gradients ``steps`` (32),
    ``baseline`` ("mean"); occlusion ``window``, ``stride``, ``baseline`` ("mean"). ``reference``: uint8
    images whose mean colour is the "mean" baseline (default: ``images`` themselves; for one photo, pass
    the training images, or the baseline would be that photo's own mean colour).
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")
    start = time.perf_counter()
    # inference_mode(False): a caller inside torch.inference_mode() still gets gradients here; tensors
    # it made in inference mode (labels, images) are cloned before autograd sees them.
    with evaluating(model), torch.inference_mode(False), torch.enable_grad():
        maps, targets, layer_name = _attribute(method, model, images, normalization, target, labels, layer,
                                               batch_size, seed, options, reference)
    return Attribution(method, maps, targets, time.perf_counter() - start, layer_name)


def _attribute(method, model, images, normalization, target, labels, layer, batch_size, seed, options, reference):
    device = _device(model)
    targets = resolve_targets(model, images, normalization, target, labels).clone()
    colours = baseline_colours(images if reference is None else reference, normalization)
    ctx = Context(model, baseline_colour={k: v.to(device) for k, v in colours.items()},
                  value_range=_value_range(images, normalization), seed=seed, options=options)
    layer_name = None
    if method in LAYER_METHODS:
        layer_name = layer if isinstance(layer, str) else None
        if layer is None:
            layer_name = default_layer(model, normalization(images[:1].to(device).clone()))
        elif isinstance(layer, str) and getattr(model, "declaration", None) is not None:
            check_cam_layer(model, layer)  # a cifarlab Net: the error lists its layers and checks the shape
        ctx.layer = resolve_layer(model, layer if layer is not None else layer_name)
    maps = []
    for b, s in enumerate(range(0, len(images), batch_size)):
        ctx.batch_index = b
        # channels-last: the layout CPU convs run fastest in (evaluate.predict_logits does the same)
        x = normalization(images[s:s + batch_size].to(device).clone()).contiguous(memory_format=torch.channels_last)
        maps.append(METHODS[method](x, targets[s:s + batch_size].to(device), ctx).float().cpu())
    h, w = images.shape[-2:]
    return (torch.cat(maps) if maps else torch.empty(0, h, w)), targets, layer_name


def attribute_all(model: nn.Module, images: torch.Tensor, normalization, methods=None,
                  **kwargs) -> dict[str, Attribution]:
    """Every method (or those named) on the same images and targets."""
    return {m: attribute(m, model, images, normalization, **kwargs) for m in (methods or METHODS)}
