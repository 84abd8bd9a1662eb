"""``cifarlab compare RUN1 RUN2 ...``: runs side by side.

One table (test accuracy with its 95% Wilson interval, ECE before and after the run's temperature, the
last validation accuracy, epochs, training time, parameters), the recipe fields that differ between the
runs, and one PNG of the validation (or test, when that is what the run validated on) accuracy and loss
per epoch of every run. Written as ``compare.csv`` and ``curves.png`` (and ``compare.html``, from the
report's Jinja2 templates, with ``html=True``) into one folder.

Every run is read through the validated readers: the checkpoint with :func:`cifarlab.checkpoints.load_checkpoint`
(its metadata holds the recipe, the per-epoch history and the training time), ``eval/results.json`` with
:func:`cifarlab.report.stored_results` (schema-checked, and only if it describes that checkpoint's weights:
a stale or missing one leaves the test columns empty and says why).
"""
from __future__ import annotations

import base64
import csv
import io
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import plots
from .errors import CifarlabError
from .fsutil import atomic_write_text

CSV_FILE = "compare.csv"
CURVES_FILE = "curves.png"
HTML_FILE = "compare.html"
MAX_RUNS = 50
CONSOLE_NAME = 32  # characters of a run name in the console table (the CSV and HTML have it whole)


class CompareError(CifarlabError):
    """Runs that cannot be compared (a folder that is not a run, the same run twice, too few runs)."""


@dataclass
class Run:
    """What the table, the curves and the recipe differences need from one run folder."""

    name: str
    path: Path
    architecture: str
    parameters: int
    recipe: dict
    data: dict            # the data it trained on: spec and number of training images
    history: list[dict]
    val_source: str
    train_seconds: float | None
    results: dict | None  # eval/results.json when it describes this checkpoint
    note: str             # why there are no test numbers ("" when there are)

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def test_accuracy(self) -> float | None:
        return self.results["accuracy"] if self.results else None

    def accuracy_interval(self) -> tuple[float, float] | None:
        from .evaluate import wilson_interval

        if not self.results or not self.results["num_images"]:
            return None
        n = self.results["num_images"]
        return wilson_interval(round(self.results["accuracy"] * n), n)

    def ece(self, side: str) -> float | None:
        """ECE ``before`` (T = 1) or ``after`` (the run's temperature) on the test set, if evaluated."""
        entry = ((self.results or {}).get("calibration") or {}).get(side)
        return entry["ece"] if entry else None

    @property
    def last_val_acc(self) -> float | None:
        value = self.history[-1].get("val_acc") if self.history else None
        return float(value) if value is not None else None


def _check_run_folder(path: Path) -> None:
    if not path.exists():
        raise CompareError(f"{path}: no such folder; pass run folders (made by cifarlab train or cifarlab run).")
    if not path.is_dir():
        raise CompareError(f"{path}: is a file, not a run folder; pass run folders (made by cifarlab train or "
                           "cifarlab run).")
    if not ((path / "final").is_dir() or (path / "checkpoints").is_dir()):
        raise CompareError(f"{path}: not a run folder (it has neither final/ nor checkpoints/); pass folders made "
                           "by cifarlab train or cifarlab run.")


def load_run(path, name: str | None = None) -> Run:
    """One run folder, read through the validated readers; a one-line error for a folder that is not a run."""
    from .checkpoints import load_checkpoint
    from .report import stored_results

    path = Path(path)
    _check_run_folder(path)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    results_path = path / "eval" / "results.json"
    if results_path.exists():
        results, why = stored_results(results_path, ckpt)
        note = f"eval/results.json {why}: run cifarlab evaluate {shlex.quote(str(path))}" if results is None else ""
    else:
        results, note = None, f"not evaluated: run cifarlab evaluate {shlex.quote(str(path))}"
    dataset = meta.get("dataset") or {}
    return Run(name=name or path.name, path=path, architecture=str(meta["architecture"].get("name", "?")),
               parameters=ckpt.model.num_parameters(), recipe=dict(meta.get("recipe") or {}),
               data={"data": dataset.get("spec", "?"), "training images": dataset.get("train_images", "?")},
               history=list(meta.get("history") or []), val_source=str(meta.get("val_source", "validation")),
               train_seconds=meta.get("train_seconds"), results=results, note=note)


def _names(paths: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_runs(paths) -> list[Run]:
    paths = [Path(p) for p in paths]
    if not 2 <= len(paths) <= MAX_RUNS:
        raise CompareError(f"compare takes 2 to {MAX_RUNS} run folders, not {len(paths)}.")
    seen = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise CompareError(f"{p}: given twice (also as {seen[key]}); pass each run once.")
        seen[key] = p
    return [load_run(p, name) for p, name in zip(paths, _names(paths))]


# ---------------------------------------------------------------------------------------------------
# The table and the recipe differences


TABLE_HEADER = ["run", "test accuracy", "95% CI", "test images", "ECE (T = 1)", "ECE (run's T)",
                "last val acc", "epochs", "train time (s)", "parameters", "architecture"]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        ci = r.accuracy_interval()
        rows.append([r.name, _pct(r.test_accuracy), "-" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}",
                     f"{r.results['num_images']:,}" if r.results else "-", _pct(r.ece("before")), _pct(r.ece("after")),
                     _pct(r.last_val_acc), str(r.epochs),
                     "-" if r.train_seconds is None else f"{r.train_seconds:.1f}", f"{r.parameters:,}", r.architecture])
    return rows


MISSING = "(not set)"


def recipe_differences(runs: list[Run]) -> list[list[str]]:
    """[field, value in run 1, value in run 2, ...] for each recipe field (and the data trained on) whose
    values are not all the same; a field a run's recipe lacks shows as "(not set)"."""
    rows = []
    for source in ("data", "recipe"):
        fields = list(dict.fromkeys(k for r in runs for k in getattr(r, source)))
        for field in fields:
            values = [getattr(r, source).get(field, MISSING) for r in runs]
            if any(v != values[0] for v in values[1:]):
                rows.append([field] + [str(v) for v in values])
    return rows


def notes(runs: list[Run]) -> list[str]:
    """What a reader must know before comparing the numbers."""
    out = [f"{r.name}: {r.note}" for r in runs if r.note]
    evaluated = [r for r in runs if r.results]
    test_sets = {(r.results.get("dataset"), r.results["num_images"]) for r in evaluated}
    if len(test_sets) > 1:
        out.append("The runs were evaluated on different test sets ("
                   + "; ".join(f"{r.name}: {r.results.get('dataset', '?')}, {r.results['num_images']:,} images"
                               for r in evaluated) + "): their test numbers are not comparable.")
    sources = {r.val_source for r in runs}
    if len(sources) > 1:
        out.append("The runs validated on different data (" + "; ".join(f"{r.name}: {r.val_source}" for r in runs)
                   + "): compare their curves with care.")
    return out


def console_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; names shortened to :data:`CONSOLE_NAME` characters."""
    def short(text: str) -> str:
        return text if len(text) <= CONSOLE_NAME else text[:CONSOLE_NAME - 1] + "\u2026"

    cells = [[short(str(c)) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Files


def _csv_text(value) -> str:
    """A text cell a spreadsheet will not run as a formula (a leading = + - @ is quoted with ')."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(runs: list[Run], path: Path) -> Path:
    """One row per run: the table's numbers unrounded, then every recipe field that differs."""
    differing = [row[0] for row in recipe_differences(runs)]
    header = ["run", "path", "test_accuracy", "ci95_low", "ci95_high", "test_images", "ece", "ece_after_temperature",
              "last_val_acc", "val_source", "epochs", "train_seconds", "parameters", "architecture"] + differing
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in runs:
        ci = r.accuracy_interval() or ("", "")
        values = {**r.data, **r.recipe}
        writer.writerow([_csv_text(r.name), _csv_text(r.path), _num(r.test_accuracy), _num(ci[0]), _num(ci[1]),
                         r.results["num_images"] if r.results else "", _num(r.ece("before")), _num(r.ece("after")),
                         _num(r.last_val_acc), _csv_text(r.val_source), r.epochs, _num(r.train_seconds), r.parameters,
                         _csv_text(r.architecture)] + [_csv_text(values.get(f, MISSING)) for f in differing])
    atomic_write_text(path, buf.getvalue())
    return path


def _num(v) -> str:
    return "" if v is None or v == "" else f"{v:.6g}"


def curves_plot(runs: list[Run], path: Path) -> Path:
    """Validation accuracy and loss per epoch, one colour per run (training values dashed)."""
    plt = plots.pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "turbo")
    for i, r in enumerate(runs):
        color = colors(i % 10 if len(runs) <= 10 else i / max(len(runs) - 1, 1))
        epochs = [row.get("epoch", j + 1) for j, row in enumerate(r.history)]
        label = _legend_name(r.name)
        for ax, key in ((acc_ax, "acc"), (loss_ax, "loss")):
            val = [row.get(f"val_{key}") for row in r.history]
            if val and all(v is not None for v in val):
                ax.plot(epochs, val, "o-", color=color, label=f"{label} ({r.val_source})", markersize=4)
            train = [row.get(f"train_{key}") for row in r.history]
            if train and all(v is not None for v in train):
                ax.plot(epochs, train, "--", color=color, alpha=0.5, linewidth=1)
        if r.test_accuracy is not None:  # the final test accuracy, where the run was evaluated
            acc_ax.plot([epochs[-1] if epochs else 0], [r.test_accuracy], "*", color=color, markersize=12)
    acc_ax.set_title("Accuracy per epoch (solid: validation, dashed: training, star: test)", fontsize=10)
    loss_ax.set_title("Loss per epoch (solid: validation, dashed: training)", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in ((acc_ax, "accuracy"), (loss_ax, "cross-entropy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if any(line.get_label()[:1] != "_" for line in acc_ax.get_lines()):
        acc_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return plots.save_figure(fig, path)


def _legend_name(name: str) -> str:
    """matplotlib leaves out a legend label that starts with '_'; a name is shortened for the figure."""
    short = name if len(name) <= 40 else name[:39] + "\u2026"
    return "\u200b" + short if short.startswith("_") else short


def write_html(runs: list[Run], path: Path, curves: Path) -> Path:
    from . import templates

    png = base64.b64encode(curves.read_bytes()).decode("ascii")
    differences = recipe_differences(runs)
    page = templates.render(
        "compare.html", title=f"cifarlab compare: {len(runs)} runs",
        table={"kind": "table", "header": TABLE_HEADER, "rows": table_rows(runs), "numeric_from": 1},
        differences={"kind": "table", "header": ["field"] + [r.name for r in runs], "rows": differences,
                     "numeric_from": 1},
        curves={"kind": "figure", "src": f"data:image/png;base64,{png}", "alt": "accuracy and loss per epoch"},
        notes=notes(runs), runs=[{"name": r.name, "path": str(r.path)} for r in runs])
    atomic_write_text(path, page)
    return path


def compare(paths, out_dir, html: bool = False, log=print) -> dict[str, Path]:
    """Everything in the module docstring: prints the table, the recipe differences and the notes, and
    writes the files into ``out_dir`` (created); returns their paths."""
    runs = load_runs(paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"{out_dir}: exists and is not a folder; choose another --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    log(console_table(TABLE_HEADER, table_rows(runs)))
    differences = recipe_differences(runs)
    log("\nRecipe differences:" if differences else "\nThe recipes are the same.")
    if differences:
        log(console_table(["field"] + [r.name for r in runs], differences))
    for line in notes(runs):
        log(f"note: {line}")
    files = {"csv": write_csv(runs, out_dir / CSV_FILE), "curves": curves_plot(runs, out_dir / CURVES_FILE)}
    if html:
        files["html"] = write_html(runs, out_dir / HTML_FILE, files["curves"])
    return files
