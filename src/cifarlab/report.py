"""One self-contained HTML report per run: ``RUN/report.html``.

Everything a reader needs to judge a run on one page, readable offline: the model summary, the recipe,
the final numbers, training curves, confusion matrix, per-class accuracy, prediction gallery, worst
mistakes, maximum stimuli per layer, class stimuli with the net's probabilities, first-layer filters,
activation maps, saliency and Grad-CAM. Images are inlined as base64 PNG data URIs, there is no script
and no external resource, so the file can be mailed or archived alone.

Inputs come from the run folder where they exist (``eval/results.json`` and its PNGs from
:func:`cifarlab.pipeline.evaluate_to_folder`, ``training_curves.png``) and are computed where they do
not. Visualizations are rendered into ``RUN/visualize/``.
"""
from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from . import plots
from .errors import ReportError
from .evaluate import TTA_LEVELS, tta_level
from .fsutil import atomic_write_text
from .models import summary

SECTIONS = [
    ("overview", "Overview"), ("results", "Final numbers"), ("curves", "Training curves"),
    ("confusion", "Confusion matrix"), ("per-class", "Per-class accuracy"), ("gallery", "Predictions"),
    ("mistakes", "Worst mistakes"), ("stimuli", "Maximum stimuli per layer"), ("classes", "Class stimuli"),
    ("filters", "First-layer filters"), ("activations", "Activation maps"),
    ("attributions", "Saliency and Grad-CAM"), ("model", "Model summary"), ("recipe", "Recipe"),
]

EVAL_PNGS = ("confusion_matrix.png", "per_class_accuracy.png", "gallery.png", "worst_mistakes.png")



# ---------------------------------------------------------------------------------------------------
# Gathering the inputs


def _load_inputs(run_dir: Path, ckpt, data, log):
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (it does not exist or is a file)")
    if ckpt is None:
        from .checkpoints import load_checkpoint

        ckpt = load_checkpoint(run_dir)
    if data is None:
        from .data import load_dataset

        spec = (ckpt.meta.get("dataset") or {}).get("spec", "cifar10")
        log(f"loading {spec} for the report")
        data = load_dataset(spec, download=False, progress=False)
    return ckpt, data


def _results(run_dir: Path, ckpt, data, log) -> dict:
    """``eval/results.json`` if it describes this checkpoint and its plots exist, else evaluate now."""
    from .pipeline import evaluate_to_folder

    eval_dir = run_dir / "eval"
    path = eval_dir / "results.json"
    if path.exists() and all((eval_dir / name).exists() for name in EVAL_PNGS):
        results, why = _stored_results(path, ckpt)
        if results is not None:
            return results
        log(f"{path}: {why}; evaluating {ckpt.path} again")
    else:
        log(f"evaluating {ckpt.path} on the test set into {eval_dir}")
    seed = int(ckpt.meta.get("recipe", {}).get("seed", 0))
    evaluate_to_folder(ckpt, data, eval_dir, seed=seed)
    return json.loads(path.read_text(encoding="utf-8"))


def _stored_results(path: Path, ckpt) -> tuple[dict | None, str]:
    """(results, "") when ``path`` is well-formed and describes exactly this checkpoint, else (None, why):
    checked before any rendering, so a malformed or stale file is recomputed instead of crashing the page."""
    from .validation import ValidationError, check_results, load_json_file

    try:
        results = check_results(load_json_file(path, "evaluation results"), path)
    except ValidationError as e:
        return None, f"unusable ({str(e).removeprefix(f'{path}: ')})"
    if not _same_path(results["checkpoint"], ckpt.path):
        return None, f"is for another checkpoint ({results['checkpoint']})"
    sha = results.get("weights_sha256")
    if sha is not None and sha != ckpt.meta.get("weights_sha256"):
        return None, "is for other weights of this checkpoint (it was trained further since)"
    if results["classes"] != list(ckpt.meta.get("classes", [])):
        return None, "names other classes than the checkpoint"
    return results, ""


def _same_path(a, b) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def _curves(run_dir: Path, ckpt) -> Path | None:
    path = run_dir / "training_curves.png"
    if path.exists():
        return path
    history = ckpt.meta.get("history") or []
    if not history:
        return None
    return plots.training_curves(history, path, val_source=ckpt.meta.get("val_source", "validation"))


# ---------------------------------------------------------------------------------------------------
# HTML pieces


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(path, alt: str) -> str:
    """An <img> with the PNG inlined; a visible note instead if the file is missing."""
    if path is None or not Path(path).exists():
        return f'<p class="missing">Not available: {_esc(alt)}.</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}"></figure>'


def _table(header: list[str] | None, rows: list[list], numeric_from: int = 1) -> str:
    """A table; cells from column ``numeric_from`` on are right-aligned. No header row for None."""
    head = f"<thead><tr>{''.join(f'<th>{_esc(h)}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i >= numeric_from else ""}">{_esc(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _section(sid: str, body: str, intro: str = "") -> str:
    title = dict(SECTIONS)[sid]
    intro_html = f'<p class="intro">{intro}</p>' if intro else ""
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{intro_html}{body}</section>'


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --bg: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); }
header { padding: 24px 32px 12px; border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: var(--muted); }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 32px;
      display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; z-index: 1; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1280px; margin: 0 auto; padding: 8px 32px 48px; }
section { padding: 16px 0; border-bottom: 1px solid var(--line); }
h2 { font-size: 19px; margin: 8px 0 10px; }
h3 { font-size: 15px; margin: 16px 0 6px; color: var(--muted); }
.intro, .missing { color: var(--muted); max-width: 900px; }
figure { margin: 8px 0; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 12px; overflow-x: auto;
      font-size: 12.5px; line-height: 1.35; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th { background: var(--bg); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 160px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .label { color: var(--muted); font-size: 13px; }
"""


def _cards(results: dict, ckpt) -> str:
    items = [(_pct(results["accuracy"]), "test accuracy" + (f" ({TTA_LEVELS[tta_level(results.get('tta'))]})" if results.get("tta") else "")),
             (f"{results['loss']:.4f}", "test loss"), (f"{results['num_images']:,}", "test images"),
             (f"{ckpt.model.num_parameters():,}", "parameters"),
             (str(ckpt.meta.get("epoch") if ckpt.meta.get("epoch") is not None else "-"), "epochs trained")]
    if ckpt.meta.get("train_seconds"):
        items.append((f"{ckpt.meta['train_seconds']:.0f} s", "training time"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{_esc(v)}</div><div class="label">{_esc(k)}</div></div>'
        for v, k in items) + "</div>"


def _probability_table(probs: dict[str, dict[str, float]]) -> str:
    methods = list(probs)
    classes = list(next(iter(probs.values()))) if probs else []
    rows = [[c] + [f"{probs[m][c]:.3f}" for m in methods] for c in classes]
    rows.append(["minimum"] + [f"{min(probs[m].values()):.3f}" for m in methods])
    return _table(["class"] + [f"p(class | stimulus), {m} method" for m in methods], rows)


def _numbers_sections(run_dir: Path, ckpt, results: dict, curves) -> list[str]:
    """Overview, final numbers, curves, confusion matrix, per-class accuracy, gallery, mistakes."""
    eval_dir = run_dir / "eval"
    val_source = ckpt.meta.get("val_source", "validation set")
    dataset = ckpt.meta.get("dataset") or {"spec": "cifar10"}
    shape = "x".join(map(str, dataset.get("image_shape", [3, 32, 32])))
    overview = _table(None, [
        ["run folder", str(run_dir)], ["checkpoint", str(ckpt.path)],
        ["architecture", ckpt.meta.get("architecture", {}).get("name", "?")],
        ["data", f"{dataset.get('spec', '?')}: {len(results['classes'])} classes, images {shape}, "
                 f"{dataset.get('train_images', '?')} training images"],
        ["validation during training", val_source],
        ["versions", ", ".join(f"{k} {v}" for k, v in ckpt.meta.get("versions", {}).items())]], 2)
    numbers = _table(["metric", "value"], [
        ["test accuracy", _pct(results["accuracy"])], ["test loss (cross-entropy)", f"{results['loss']:.4f}"],
        ["test images", f"{results['num_images']:,}"], ["test-time augmentation", TTA_LEVELS[tta_level(results.get("tta"))]]])
    # Sorted worst first: with 100 classes the table is read from the top for what fails.
    per_class = [[c, _pct(results["per_class_accuracy"][c])] for c in
                 sorted(results["classes"], key=lambda c: results["per_class_accuracy"][c])]
    confused = [[p["true"], p["predicted"], p["count"]] for p in results.get("most_confused", [])]
    mistakes = [[m["index"], m["true"], m["predicted"], f"{m['score']:.3f}"]
                for m in results.get("worst_mistakes", [])]
    return [
        _section("overview", _cards(results, ckpt) + overview),
        _section("results", numbers),
        _section("curves", _img(curves, "training curves"),
                 f"Loss and accuracy per epoch; validation on the {_esc(val_source)}."),
        _section("confusion", _img(eval_dir / "confusion_matrix.png", "confusion matrix")
                 + ("<h3>Most confused pairs</h3>" + _table(["true", "predicted as", "test images"], confused, 2)
                    if confused else "")),
        _section("per-class", _img(eval_dir / "per_class_accuracy.png", "per-class accuracy")
                 + _table(["class (worst first)", "test accuracy"], per_class)),
        _section("gallery", _img(eval_dir / "gallery.png", "random test predictions"),
                 "Random test images with the predicted class, its probability and the true class."),
        _section("mistakes", _img(eval_dir / "worst_mistakes.png", "most confident mistakes")
                 + _table(["test index", "true", "predicted", "probability"], mistakes, 3),
                 "The wrong predictions the net was most sure of."),
    ]


CLASS_INTRO = (
    "Inputs that maximize each class logit, saved as 8-bit images and fed back through the net (re-normalized "
    "as in training): p is the probability it gives the class each was made for. The default method uses random "
    "jitter, scale and rotation, total-variation and L2 penalties and a color space decorrelated with CIFAR-10's "
    "own color covariance; the exercise method is the original notebook's 20 normalized gradient steps.")


def _visual_sections(vis) -> list[str]:
    """Stimuli per layer, class stimuli with probabilities, filters, activation maps, saliency/Grad-CAM."""
    files = vis.files
    stimuli = "".join(f"<h3>{_esc(key[len('stimuli_'):])}</h3>" + _img(path, key.replace("_", " ", 1))
                      for key, path in files.items() if key.startswith("stimuli_"))
    classes = "".join(f"<h3>{_esc(m)} method</h3>" + _img(files.get(f"classes_{m}"), f"class stimuli, {m} method")
                      for m in vis.class_probabilities)
    seconds = next(iter(vis.seconds.values()), 0.0)
    return [
        _section("stimuli", stimuli,
                 f"For every channel of every conv layer and residual block (after its activation), the input "
                 f"found by gradient "
                 f"ascent ({_esc(vis.method)} method) that maximizes the channel's mean activation; all channels "
                 f"of a layer optimized as one batch, {seconds:.1f} s for all layers and classes."),
        _section("classes", classes + _probability_table(vis.class_probabilities), CLASS_INTRO),
        _section("filters", _img(files.get("filters"), "first-layer filters")),
        _section("activations", _img(files.get("activations"), "activation maps"),
                 "What each conv layer's (or residual block's) channels respond to in one test image (after "
                 "the activation)."),
        _section("attributions", _img(files.get("attributions"), "saliency and Grad-CAM"),
                 "Top: test images with the prediction. Middle: saliency, the size of the gradient of the "
                 "predicted logit with respect to each pixel. Bottom: Grad-CAM on the layer the title names "
                 "(by default the last conv layer or residual block)."),
    ]


def _model_sections(ckpt) -> list[str]:
    recipe = ckpt.meta.get("recipe", {})
    recipe_html = (_table(["setting", "value"], [[k, v] for k, v in recipe.items()]) if recipe
                   else '<p class="missing">No recipe stored in the checkpoint.</p>')
    return [_section("model", f"<pre>{_esc(summary(ckpt.model))}</pre>"), _section("recipe", recipe_html)]


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    nav = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in SECTIONS)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_esc(title)}</h1><p>{_esc(subtitle)}</p></header><nav>{nav}</nav>"
            "<main>\n" + "\n".join(sections) + "\n</main></body></html>\n")


def _html(run_dir: Path, ckpt, results: dict, curves, vis) -> str:
    subtitle = (f"{ckpt.meta.get('architecture', {}).get('name', '')} \u00b7 test accuracy "
                f"{_pct(results['accuracy'])} \u00b7 generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    sections = _numbers_sections(run_dir, ckpt, results, curves) + _visual_sections(vis) + _model_sections(ckpt)
    return _page(f"cifarlab report: {run_dir.resolve().name}", subtitle, sections)


# ---------------------------------------------------------------------------------------------------
# Public API


def build_report(run_dir, ckpt=None, data=None, log=print, *, settings=None, seed: int | None = None,
                 images=None) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    ``ckpt`` defaults to the run's final (else newest good) checkpoint, ``data`` to CIFAR-10 found the
    usual way (no download). ``settings``/``seed``/``images`` go to :func:`cifarlab.visualize.render_all`.
    """
    from . import visualize

    run_dir = Path(run_dir)
    ckpt, data = _load_inputs(run_dir, ckpt, data, log)
    results = _results(run_dir, ckpt, data, log)
    curves = _curves(run_dir, ckpt)
    if seed is None:
        seed = int(ckpt.meta.get("recipe", {}).get("seed", 0))
    vis = visualize.render_all(ckpt, run_dir / "visualize", data=data, seed=seed, images=images,
                               settings=settings, log=log)
    path = run_dir / "report.html"
    atomic_write_text(path, _html(run_dir, ckpt, results, curves, vis))
    return path
