"""One self-contained HTML report per run: ``RUN/report.html``.

Everything a reader needs to judge a run on one page, readable offline: the model summary, the recipe,
the final numbers, training curves and their diagnosis (:mod:`cifarlab.doctor`), confusion matrix,
per-class accuracy, prediction gallery, worst mistakes, maximum stimuli per layer, class stimuli with the
net's probabilities, first-layer filters, activation maps, saliency and Grad-CAM. Images are inlined as
base64 PNG data URIs, there is no script and no external resource, so the file can be mailed or archived
alone.

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
from .doctor import diagnose
from .errors import ReportError
from .evaluate import TTA_LEVELS, tta_level
from .fsutil import atomic_write_text
from .models import summary

SECTIONS = [
    ("overview", "Overview"), ("results", "Final numbers"), ("curves", "Training curves"),
    ("diagnosis", "Diagnosis of the training curves"),
    ("confusion", "Confusion matrix"), ("per-class", "Per-class accuracy"), ("quality", "Per-class quality"),
    ("calibration", "Calibration"), ("shift", "Distribution shift"), ("gallery", "Predictions"),
    ("mistakes", "Worst mistakes"), ("stimuli", "Maximum stimuli per layer"), ("classes", "Class stimuli"),
    ("filters", "First-layer filters"), ("activations", "Activation maps"),
    ("attributions", "Saliency and Grad-CAM"), ("explanations", "Attributions"),
    ("examples", "Dataset examples"), ("model", "Model summary"), ("recipe", "Recipe"),
]

EVAL_PNGS = ("confusion_matrix.png", "per_class_accuracy.png", "gallery.png", "worst_mistakes.png", "reliability.png")



# ---------------------------------------------------------------------------------------------------
# Gathering the inputs


def _load_inputs(run_dir: Path, ckpt, data, log):
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (it does not exist or is a file)")
    if ckpt is None:
        from .checkpoints import load_checkpoint

        ckpt = load_checkpoint(run_dir)
    if data is None:
        from .data import load_stored

        entry = ckpt.meta.get("dataset") or {}
        log(f"loading {entry.get('spec', 'cifar10')} for the report")
        data = load_stored(entry)  # the same size and fit the model was trained on
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


def _diagnosis(ckpt) -> tuple[list[str], str]:
    """(finding texts, where they come from): the trainer's stored diagnosis, else one computed from the
    checkpoint's history; no texts and a reason when neither is possible. Meta values are checked, not
    trusted: a checkpoint is a file anyone can hand over."""
    meta = ckpt.meta
    stored = meta.get("diagnosis")
    texts = ([f["text"] for f in stored if isinstance(f, dict) and isinstance(f.get("text"), str)]
             if isinstance(stored, list) else [])
    if texts:
        return texts, "Stored by the trainer with the final checkpoint."
    if not meta.get("history"):
        return [], "The checkpoint stores no training history: nothing to diagnose."
    val_size = meta.get("val_size")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        return [], ("The checkpoint does not store the number of validation images, which the 2-standard-error "
                    "rule needs: not diagnosed.")
    recipe = meta.get("recipe") or {}
    findings = diagnose(meta["history"], val_size, str(meta.get("val_source", "validation")),
                        mixed_batches=bool(recipe.get("mixup") or recipe.get("cutmix")))
    return [f.text for f in findings], "Computed from the history stored in the checkpoint."


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
    """``body`` is HTML; ``intro`` is plain text, escaped here (it carries values read from files)."""
    title = dict(SECTIONS)[sid]
    intro_html = f'<p class="intro">{_esc(intro)}</p>' if intro else ""
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{intro_html}{body}</section>'


def _diagnosis_section(ckpt) -> str:
    texts, source = _diagnosis(ckpt)
    if not texts:
        return _section("diagnosis", f'<p class="missing">{_esc(source)}</p>')
    body = "<ul>" + "".join(f"<li>{_esc(t)}</li>" for t in texts) + "</ul>"
    return _section("diagnosis", body,
                    "The training doctor: each statement is made only when the difference exceeds 2 binomial "
                    "standard errors of the validation accuracy, 2 sqrt(p(1-p)/n) with n the validation images "
                    f"(rules: cifarlab.doctor). {source}")


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
    """Overview, final numbers, curves and their diagnosis, confusion matrix, per-class accuracy, gallery,
    mistakes."""
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
                 f"Loss and accuracy per epoch; validation on the {val_source}."),
        _diagnosis_section(ckpt),
        _section("confusion", _img(eval_dir / "confusion_matrix.png", "confusion matrix")
                 + ("<h3>Most confused pairs</h3>" + _table(["true", "predicted as", "test images"], confused, 2)
                    if confused else "")),
        _section("per-class", _img(eval_dir / "per_class_accuracy.png", "per-class accuracy")
                 + _table(["class (worst first)", "test accuracy"], per_class)),
        _section("quality", _quality_table(results),
                 "Precision: of the test images predicted as the class, the share that are it. Recall: of the "
                 "class's test images, the share predicted as it (its accuracy). F1: their harmonic mean."),
        _calibration_section(eval_dir, results),
        _shift_section(results),
        _section("gallery", _img(eval_dir / "gallery.png", "random test predictions"),
                 "Random test images with the predicted class, its probability and the true class."),
        _section("mistakes", _img(eval_dir / "worst_mistakes.png", "most confident mistakes")
                 + _table(["test index", "true", "predicted", "probability"], mistakes, 3),
                 "The wrong predictions the net was most sure of."),
    ]


def _quality_table(results: dict) -> str:
    quality = results.get("per_class")
    if not quality:
        return '<p class="missing">Not in this results.json (evaluated by an older cifarlab): re-run cifarlab evaluate.</p>'
    names = list(quality)
    many = len(names) > 20
    if many:  # with many classes the table is read from the top for what fails
        names.sort(key=lambda c: quality[c]["f1"])
    rows = [[c, _pct(quality[c]["precision"]), _pct(quality[c]["recall"]), f"{quality[c]['f1']:.3f}",
             quality[c]["support"]] for c in names]
    macro = results.get("macro_f1")
    note = f"<p>Macro-averaged F1: {macro:.3f}.</p>" if macro is not None else ""
    return note + _table([f"class{' (worst F1 first)' if many else ''}", "precision", "recall", "F1",
                          "test images"], rows)


def _calibration_section(eval_dir: Path, results: dict) -> str:
    cal = results.get("calibration")
    if not cal:
        return _section("calibration", '<p class="missing">Not in this results.json (evaluated by an older '
                                       'cifarlab): re-run cifarlab evaluate.</p>')
    before, after = cal["before"], cal.get("after")
    metrics = [("ECE (expected calibration error)", "ece", _pct), ("MCE (worst bin)", "mce", _pct),
               ("NLL (nats)", "nll", lambda v: f"{v:.4f}"), ("Brier score (sum over classes)", "brier",
                                                             lambda v: f"{v:.4f}"),
               ("accuracy", "accuracy", _pct)]
    header = ["metric (test set)", "softmax" if not after else "before (T = 1)"]
    if after:
        header.append(f"after (T = {cal['temperature']:.3f})")
    rows = [[label] + [fmt(before[key])] + ([fmt(after[key])] if after else []) for label, key, fmt in metrics]
    if after:
        where = (f"The temperature T = {cal['temperature']:.3f} was fitted on {cal.get('fitted_on')} "
                 "(the run's --val-split hold-out, never the test set) by minimizing their NLL; dividing the "
                 "logits by T leaves every prediction, so the accuracy, unchanged.")
    else:
        where = ("This checkpoint stores no temperature: train with --val-split N, or run cifarlab calibrate RUN "
                 "on a run that has one, to fit it on held-out training images.")
    intro = (f"Are the probabilities honest? ECE: the confidences (maximum probability) in {cal['n_bins']} "
             "equal-width bins, the mean |accuracy - confidence| weighted by bin size (Guo et al. 2017). "
             "Brier: the squared distance of the probability vector to the one-hot label, summed over classes "
             "(0..2). " + where)
    return _section("calibration", _img(eval_dir / "reliability.png", "reliability diagram") + _table(header, rows),
                    intro)


def _shift_section(results: dict) -> str:
    shift = results.get("shift") or []
    if not shift:
        return _section("shift", "<p>No shifted test set was evaluated. <code>cifarlab evaluate RUN --on "
                                 "cifar10.1</code> adds CIFAR-10.1 (2,000 new test images, Recht et al. 2018) and "
                                 "reports the accuracy gap here.</p>")
    rows = []
    for s in shift:
        lo, hi = s["accuracy_ci95"]
        rlo, rhi = s["reference_ci95"]
        glo, ghi = s["gap_ci95"]
        rows.append([s.get("dataset", "?"), f"{s['num_images']:,}", f"{_pct(s['accuracy'])} ({100 * lo:.1f}-{100 * hi:.1f})",
                     f"{_pct(s['reference_accuracy'])} ({100 * rlo:.1f}-{100 * rhi:.1f})",
                     f"{100 * s['gap']:+.2f} ({100 * glo:+.1f} to {100 * ghi:+.1f})"])
    return _section("shift", _table(["test set", "images", "accuracy (95% CI)", "original test accuracy (95% CI)",
                                     "gap, points (95% CI)"], rows),
                    "Does the accuracy hold on new images of the same classes? Intervals: Wilson for each "
                    "accuracy, normal approximation for the gap (original minus shifted).")


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
                 f"ascent ({vis.method} method) that maximizes the channel's mean activation; all channels "
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


def _explanation_sections(vis) -> list[str]:
    """Every attribution method's maps, their faithfulness and sanity numbers, dataset examples."""
    summary_path = Path(vis.out_dir) / "summary.json"
    try:
        explained = json.loads(summary_path.read_text(encoding="utf-8")).get("explanations") or {}
    except (OSError, ValueError):
        explained = {}
    if not explained.get("enabled"):
        off = '<p class="missing">Not rendered (cifarlab visualize --no-explanations, or no test data).</p>'
        return [_section("explanations", off), _section("examples", off)]
    files = explained.get("files", {})
    faith = explained.get("faithfulness") or {}
    sanity = explained.get("sanity") or {}
    maps_seconds = (explained.get("maps") or {}).get("seconds", {})
    methods = list(explained["settings"]["methods"])
    rows, verdicts = [], []
    random = faith.get("random")
    for m in methods:
        f = (faith.get("methods") or {}).get(m)
        s = (sanity.get("methods") or {}).get(m)
        seconds = (maps_seconds.get(m, 0.0) + (f["seconds_maps"] + f["seconds_curves"] if f else 0.0)
                   + (s["seconds"] if s else 0.0))
        row = [m.replace("_", " ")]
        if f:
            gain_d, gain_i = f["vs_random"]["deletion"]["mean_gain"], f["vs_random"]["insertion"]["mean_gain"]
            row += [f"{f['deletion_auc']:.3f} ± {f['deletion_auc_sem']:.3f}",
                    f"{f['insertion_auc']:.3f} ± {f['insertion_auc_sem']:.3f}",
                    f"{random['deletion_auc']:.3f} / {random['insertion_auc']:.3f}",
                    f"{gain_d:+.3f} / {gain_i:+.3f}"]
            if not _beats_random(f):
                verdicts.append(f"{m.replace('_', ' ')} is no better than random here: its deletion and insertion "
                                "AUCs do not beat a random pixel order by two standard errors.")
        else:
            row += ["-"] * 4
        if s:
            row.append(f"{s['final']:.2f}" + (" (flagged)" if s["flagged"] else ""))
            if s["flagged"]:
                verdicts.append(f"{m.replace('_', ' ')} fails the sanity check: with every layer re-initialized its "
                                f"maps still correlate {s['final']:.2f} (Spearman) with the trained net's, so they "
                                "show the image more than what the net learned.")
        else:
            row.append("-")
        row.append(f"{seconds:.1f}")
        rows.append(row)
    table = _table(["method", "deletion AUC (lower better)", "insertion AUC (higher better)",
                    "random: deletion / insertion", "gain vs random: deletion / insertion",
                    "sanity: Spearman, all layers random", "seconds"], rows)
    ranked = sorted(((f["insertion_auc"] - f["deletion_auc"], m) for m, f in (faith.get("methods") or {}).items()),
                    reverse=True)
    if ranked:
        verdicts.insert(0, f"Most faithful here (insertion minus deletion AUC): {ranked[0][1].replace('_', ' ')} "
                           f"({ranked[0][0]:.3f}; random {random['insertion_auc'] - random['deletion_auc']:.3f}).")
    fs = faith.get("settings") or {}
    intro = ("The maps of every method for the predicted class on the same test images, the colour scale fixed "
             "across the images of each method. Faithfulness (Petsiuk et al. 2018): pixels removed (to the mean "
             "colour) or inserted (into a blurred copy) in the order of the map, explaining the true class; the "
             f"area under the true-class probability curve on {fs.get('n', 0)} test images, {fs.get('steps', 0)} "
             "steps, ± one standard error. Sanity check (Adebayo et al. 2018): Spearman correlation between the "
             f"maps of the trained net and of the net with every layer re-initialized, on {sanity.get('n', 0)} "
             f"images; above {sanity.get('threshold', 0.5)} is flagged. Seconds: maps, curves and sanity check.")
    body = (_img(files.get("attribution_methods"), "attribution maps of every method") + table
            + "".join(f"<p><strong>{_esc(v)}</strong></p>" for v in verdicts)
            + (_img(files.get("faithfulness"), "deletion and insertion curves") if "faithfulness" in files else "")
            + (_img(files.get("sanity"), "cascading randomization") if "sanity" in files else ""))
    examples = explained.get("examples") or {}
    ex_rows = [[layer, len(e["channels"]), f"{e['median_ratio']:.2f}" if e["median_ratio"] is not None else "n/a",
                e["above_best_real"]] for layer, e in (examples.get("layers") or {}).items()]
    ex_body = "".join(f"<h3>{_esc(key[len('examples_'):])}</h3>" + _img(path, key.replace("_", " ", 1))
                      for key, path in files.items() if key.startswith("examples_"))
    if ex_rows:
        ex_body = _table(["layer", "channels", "median ratio stimulus / best image", "channels above 1"],
                         ex_rows) + ex_body
    else:
        ex_body = '<p class="missing">Not rendered (--example-images 0).</p>'
    ex_intro = (f"For every conv channel and every class: its maximum stimulus, then the {examples.get('k', 9)} test "
                f"images (of {examples.get('images', 0):,}) that activate it most (channel mean over space; the logit "
                "for a class). The number is the stimulus's activation over the best real image's: above 1, the "
                "stimulus drives the channel harder than any test image.")
    return [_section("explanations", body, intro), _section("examples", ex_body, ex_intro)]


def _beats_random(row: dict) -> bool:
    from .explain import beats_random

    return beats_random(row)


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
    sections = (_numbers_sections(run_dir, ckpt, results, curves) + _visual_sections(vis)
                + _explanation_sections(vis) + _model_sections(ckpt))
    return _page(f"cifarlab report: {run_dir.resolve().name}", subtitle, sections)


# ---------------------------------------------------------------------------------------------------
# Public API


def build_report(run_dir, ckpt=None, data=None, log=print, *, settings=None, seed: int | None = None,
                 images=None, explanations=None) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    ``ckpt`` defaults to the run's final (else newest good) checkpoint, ``data`` to CIFAR-10 found the
    usual way (no download). ``settings``/``seed``/``images``/``explanations`` go to :func:`cifarlab.visualize.render_all`.
    """
    from . import visualize

    run_dir = Path(run_dir)
    ckpt, data = _load_inputs(run_dir, ckpt, data, log)
    results = _results(run_dir, ckpt, data, log)
    curves = _curves(run_dir, ckpt)
    if seed is None:
        seed = int(ckpt.meta.get("recipe", {}).get("seed", 0))
    vis = visualize.render_all(ckpt, run_dir / "visualize", data=data, seed=seed, images=images,
                               settings=settings, log=log, explanations=explanations)
    path = run_dir / "report.html"
    atomic_write_text(path, _html(run_dir, ckpt, results, curves, vis))
    return path
