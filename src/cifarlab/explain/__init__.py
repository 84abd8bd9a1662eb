"""Why the net said what it said, and how far to trust the why: one package, one registry of methods.

* :mod:`.methods`: every attribution method in :data:`METHODS` (saliency, SmoothGrad, Integrated
  Gradients, occlusion, Grad-CAM, Grad-CAM++; Captum where it has one) and :func:`attribute`; Grad-CAM's
  default layer (:func:`default_layer`) is the rule ``visualize`` uses for its stimuli. ``visualize``,
  the report, ``predict --explain`` and ``explore`` all draw their maps from here; there is no second
  implementation.
* :mod:`.faithfulness`: deletion / insertion against a random order, cascading randomization;
  :func:`faithfulness_verdict` words the result per metric.
* :mod:`.examples`: the real images that excite each channel most (beside its maximum stimulus).
* :mod:`.neighbours`: the training images nearest to a photo in the net's penultimate features (from the
  run's OOD feature bank).
* :mod:`.photo`: one photo explained (``cifarlab predict --explain``): the picture as the net sees it,
  calibrated top classes, the "unlike any class" verdict, attribution maps and nearest training images, as
  a PNG and an HTML fragment.
* :mod:`.overview`: all of it over test images for ``cifarlab visualize`` (PNGs + ``explanations.json``).

Adding a method is one function and one entry in :data:`METHODS`; every consumer lists the registry.
"""
from .methods import LAYER_METHODS, METHODS, Attribution, attribute, attribute_all, default_layer
from .overview import (EXAMPLE_IMAGES, FAITHFULNESS_IMAGES, FAITHFULNESS_STEPS, SANITY_IMAGES, TOP_K, ExplainSettings,
                     beats_random, faithfulness_verdict, render)

PHOTO_METHODS = ("integrated_gradients", "grad_cam")  # predict --explain's default: one pixel-level, one layer-level

__all__ = ["METHODS", "LAYER_METHODS", "Attribution", "attribute", "attribute_all", "default_layer", "render",
           "ExplainSettings", "beats_random", "faithfulness_verdict", "PHOTO_METHODS", "FAITHFULNESS_IMAGES",
           "FAITHFULNESS_STEPS", "SANITY_IMAGES", "EXAMPLE_IMAGES", "TOP_K", "check_methods"]


def check_methods(names) -> tuple[str, ...]:
    """Method names checked against the registry (``--methods``); a clear error lists the known ones."""
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown attribution method(s) {', '.join(map(repr, unknown)) or '(none given)'}: "
                         f"use one or more of {', '.join(METHODS)}")
    return names
