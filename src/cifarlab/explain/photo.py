"""One photo explained, for ``cifarlab predict --explain`` (and the explorer): why this answer, and how sure.

For each photo: the picture exactly as the net sees it (upright, RGB, made square the run's way, resized),
the calibrated top classes (``softmax(logits / T)`` with the run's temperature, as ``predict`` prints them),
the "unlike any class I know" verdict (KNN score vs the run's threshold, :mod:`cifarlab.ood`), attribution
maps for the top class from the one registry (:mod:`cifarlab.explain.methods`; Integrated Gradients and
Grad-CAM by default), and the training images nearest to it in the net's penultimate features (from the
run's OOD feature bank), with how many of them carry the predicted label. A photo whose neighbours mostly
disagree with its label, or that is flagged, deserves less trust than its probability suggests.

Maps explain the class that is shown (``predict``'s top-1, which includes the run's test-time
augmentation); they are computed on the un-augmented picture. Integrated Gradients starts from the training
images' mean colour (the run's training images when its feature bank is loaded, else the normalization's
mean), so for one photo the baseline is the data's grey, not that photo's own mean colour.

:func:`explain_photos` computes; :func:`write_png` and :func:`html_fragment` render (PNG via matplotlib
Agg; HTML with Jinja2 autoescape, the PNG inlined, nothing fetched).
"""
from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import plots
from .methods import LAYER_METHODS, attribute

NEIGHBOURS = 5
METHOD_TITLES = {"saliency": "saliency", "smoothgrad": "SmoothGrad", "integrated_gradients": "Integrated Gradients\n(red: for, blue: against)",
                 "occlusion": "occlusion\n(red: for, blue: against)", "grad_cam": "Grad-CAM", "grad_cam_pp": "Grad-CAM++"}


@dataclass
class PhotoExplanation:
    name: str                                  # the file as the user gave it
    image: torch.Tensor                        # uint8 (C, S, S): what the net sees
    predictions: list[dict]                    # calibrated top-k [{"class", "probability"}], most likely first
    ood: dict | None = None                    # {"score", "threshold", "flag", "method", "k"} or None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> float (S, S) for the top class
    layer: str | None = None                   # Grad-CAM's layer
    neighbours: list[dict] = field(default_factory=list)         # [{"index", "class", "similarity"}]
    neighbour_images: torch.Tensor | None = None                 # uint8 (n, C, S, S)
    notes: list[str] = field(default_factory=list)               # what is missing and why

    @property
    def label(self) -> str:
        return self.predictions[0]["class"]

    @property
    def agree(self) -> int:
        """How many nearest training images carry the predicted label."""
        return sum(n["class"] == self.label for n in self.neighbours)

    def verdict(self) -> str:
        if self.ood is None:
            return "no out-of-distribution check (no feature bank)"
        word = "UNLIKE ANY CLASS I KNOW" if self.ood["flag"] else "like the training images"
        return f"{word} (score {self.ood['score']:.2f}, threshold {self.ood['threshold']:.2f})"

    def to_dict(self) -> dict:
        return {"image": self.name, "predictions": self.predictions, "ood": self.ood,
                "methods": list(self.maps), "gradcam_layer": self.layer, "neighbours": self.neighbours,
                "neighbours_agreeing": self.agree if self.neighbours else None, "notes": self.notes}


def explain_photos(ckpt, images: torch.Tensor, names: list[str], predictions: list[list[dict]], detector=None,
                   methods=("integrated_gradients", "grad_cam"), neighbours: int = NEIGHBOURS,
                   ood_entries: list[dict | None] | None = None) -> list[PhotoExplanation]:
    """Explanations of uint8 ``images`` (N, C, S, S) already read the run's way; ``predictions``: each
    image's calibrated top-k (``predict.predict_images``); ``detector``: the run's
    :class:`~cifarlab.ood.OODDetector` (None: no verdict and no neighbours, said in ``notes``)."""
    from ..ood import FLAG_SCORE, network_features
    from ..transforms import Normalization

    classes = list(ckpt.meta["classes"])
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    model = ckpt.model
    targets = torch.tensor([classes.index(p[0]["class"]) for p in predictions], dtype=torch.long)
    reference = baseline_reference(detector, normalization)
    maps, layer = {}, None
    for method in methods:
        a = attribute(method, model, images, normalization, target=targets, reference=reference)
        maps[method] = a.maps
        layer = a.layer or layer
    out = [PhotoExplanation(name, images[i], predictions[i], (ood_entries or [None] * len(images))[i],
                            {m: v[i] for m, v in maps.items()}, layer) for i, name in enumerate(names)]
    if detector is None or detector.train is None:
        for e in out:
            e.notes.append("nearest training images unavailable: the run's feature bank was not loaded")
        return out
    features, pooled, logits = network_features(model, images, normalization, list(detector.layer_banks))
    sims, indices = detector.nearest(features, neighbours)
    flag_scores = detector.scores_of(features, logits, pooled)[FLAG_SCORE]
    for e, s_row, i_row, score in zip(out, sims.tolist(), indices.tolist(), flag_scores):
        labels = detector.train.labels[i_row].tolist()
        e.neighbours = [{"index": int(i), "class": classes[int(c)], "similarity": float(s)}
                        for i, c, s in zip(i_row, labels, s_row)]
        e.neighbour_images = detector.train.images[i_row]
        if e.ood is None:
            e.ood = detector.entry(float(score))
    return out


def baseline_reference(detector, normalization) -> torch.Tensor:
    """What Integrated Gradients' "mean" baseline is the mean colour of: the run's training images, or a
    (1, C, 1, 1) image of the normalization's mean (0..255) when they are not loaded."""
    from .methods import mean_colour

    if detector is not None and detector.train is not None:
        if getattr(detector, "train_mean_colour", None) is None:  # one pass over 50,000 images: once per detector
            detector.train_mean_colour = mean_colour(detector.train.images)
        return detector.train_mean_colour
    return torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0


# ---------------------------------------------------------------------------------------------------
# Rendering


def file_stem(index: int, name: str) -> str:
    """``003-ant_photo``: the position keeps names unique, the rest is the file's stem made safe for any file
    system (at most 60 characters)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).stem).strip("._") or "image"
    return f"{index:03d}-{stem[:60]}"


def write_png(e: PhotoExplanation, path) -> Path:
    """One figure: the picture as seen, each map over it, the top classes and the verdict; below, the
    nearest training images with their labels and similarities."""
    plt = plots.pyplot()
    seen = plots.to_hwc(e.image[None])[0]
    n_top = 1 + len(e.maps)
    n_nb = len(e.neighbours)
    cols = max(n_top + 1, n_nb, 1)
    fig = plt.figure(figsize=(2.1 * cols, 5.2 if n_nb else 2.9))
    grid = fig.add_gridspec(2 if n_nb else 1, cols, height_ratios=[1.25, 1] if n_nb else [1], hspace=0.45)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(seen, interpolation="nearest")
    ax.set_title("as the net sees it", fontsize=8)
    ax.axis("off")
    for j, (method, m) in enumerate(e.maps.items(), start=1):
        ax = fig.add_subplot(grid[0, j])
        _draw_map(ax, seen, m, method)
        title = METHOD_TITLES.get(method, method) + (f"\n({e.layer})" if method in LAYER_METHODS and e.layer else "")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, n_top:])
    ax.axis("off")
    lines = [f"{r}. {p['class']}  {100 * p['probability']:.1f}%" for r, p in enumerate(e.predictions, 1)]
    ax.text(0.0, 0.95, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", parse_math=False,
            transform=ax.transAxes)
    ax.text(0.0, 0.12, _wrap(e.verdict(), 40), va="bottom", ha="left", fontsize=8, parse_math=False,
            color="crimson" if e.ood and e.ood["flag"] else "black", transform=ax.transAxes)
    for j, nb in enumerate(e.neighbours):
        ax = fig.add_subplot(grid[1, j])
        ax.imshow(plots.to_hwc(e.neighbour_images[j:j + 1])[0], interpolation="nearest")
        ax.set_title(f"{_short(nb['class'])}\ncos {nb['similarity']:.2f}", fontsize=8,
                     color="black" if nb["class"] == e.label else "crimson")
        ax.axis("off")
    agree = f"; nearest training images: {e.agree} of {n_nb} are '{_short(e.label)}'" if n_nb else ""
    fig.suptitle(_wrap(f"{_short(Path(e.name).name, 60)}: {_short(e.label)} "
                       f"{100 * e.predictions[0]['probability']:.1f}%{agree}", 110), fontsize=10)
    for t in fig.texts + [a.title for a in fig.axes]:
        t.set_parse_math(False)  # class and file names are data, never TeX
    return plots.save_figure(fig, path)


def _draw_map(ax, seen: np.ndarray, m: torch.Tensor, method: str) -> None:
    """Signed maps (Integrated Gradients, occlusion) on a symmetric red/blue scale over a grey copy of the
    picture; non-negative ones (saliency, Grad-CAM) as a heat overlay scaled to the photo's maximum."""
    from .overview import method_scale  # the 99.5th percentile of |map|: one hot pixel does not wash it out

    m = m.detach().float()
    vmin, vmax, _ = method_scale(m)
    if vmin < 0:
        ax.imshow(seen.mean(2), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.imshow(m.numpy(), cmap="RdBu_r", vmin=vmin, vmax=vmax, alpha=0.7, interpolation="nearest")
    else:
        ax.imshow(seen, interpolation="nearest")
        ax.imshow(m.numpy(), cmap="jet", vmin=0, vmax=vmax, alpha=0.5, interpolation="bilinear")


def _short(text: str, limit: int = 24) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


_FRAGMENT = """\
<section class="cifarlab-explanation">
  <h3>{{ name }}</h3>
  <img src="data:image/png;base64,{{ png }}" alt="explanation of {{ name }}" style="max-width:100%">
  <table>
    <caption>top classes (calibrated{{ ", T = %.3f" % temperature if temperature else "" }})</caption>
    {% for p in predictions %}<tr><td>{{ loop.index }}.</td><td>{{ p["class"] }}</td>
      <td>{{ "%.1f" % (100 * p["probability"]) }}%</td></tr>
    {% endfor %}
  </table>
  <p class="verdict{{ ' flagged' if flagged else '' }}">{{ verdict }}</p>
  {% if neighbours %}<p>Nearest training images: {{ agree }} of {{ neighbours|length }} are
    &ldquo;{{ label }}&rdquo;: {% for n in neighbours %}{{ n["class"] }} ({{ "%.2f" % n["similarity"] }}){{
    ", " if not loop.last }}{% endfor %}.</p>{% endif %}
  {% for note in notes %}<p class="note">{{ note }}</p>{% endfor %}
</section>
"""


def html_fragment(e: PhotoExplanation, png_path, temperature: float | None = None) -> str:
    """A self-contained ``<section>`` (the PNG inlined as a data: URI); every name is escaped."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    png = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    return env.from_string(_FRAGMENT).render(
        name=e.name, png=png, predictions=e.predictions, verdict=e.verdict(), flagged=bool(e.ood and e.ood["flag"]),
        neighbours=e.neighbours, agree=e.agree, label=e.label, notes=e.notes,
        temperature=temperature if temperature and math.isfinite(temperature) else None)


def write_all(explanations: list[PhotoExplanation], out_dir, temperature: float | None = None) -> list[dict]:
    """``NNN-stem.png`` and ``NNN-stem.html`` per photo into ``out_dir`` (made if missing), written atomically;
    returns each photo's {"png", "html"}."""
    from ..errors import ImageError
    from ..fsutil import atomic_write_bytes

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ImageError(f"{out_dir}: exists and is not a folder; choose another --explain-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, e in enumerate(explanations, start=1):
        stem = file_stem(i, e.name)
        png = write_png(e, out_dir / f"{stem}.png")
        html = out_dir / f"{stem}.html"
        atomic_write_bytes(html, html_fragment(e, png, temperature).encode("utf-8"))
        written.append({"png": str(png), "html": str(html)})
    return written
