"""Hyperparameter search on Optuna: ``cifarlab sweep SWEEP_DIR``.

A sweep is a folder:

    SWEEP_DIR/study.db        Optuna's storage (SQLite, the default; any database URL with --storage)
    SWEEP_DIR/sweep.json      what is searched, from which recipe, on which data (also kept in the study)
    SWEEP_DIR/trial-0007/     one normal run folder per trial (checkpoints, final/, metrics.csv ...) and its
                              trial.json (number, parameters, state, accuracy); pruned.json if it was pruned
    SWEEP_DIR/trials.csv      trial, state, validation accuracy, seconds, parameters, one row per trial
    SWEEP_DIR/search.png      the search: accuracy per trial (best so far) and against each parameter

The objective is the final model's accuracy on the recipe's ``val_split`` images held out of the training
set (required: a search never looks at the test set). Each epoch's accuracy is reported to the trial
(``train/callbacks/pruning.py``), so a pruner (Hyperband, successive halving, median) stops unpromising
trials after an epoch. ``--trials N`` is the number of finished trials (complete, pruned, or failed by
their own parameters, e.g. a diverging learning rate) the study should hold.

The storage is the study's memory: re-running the same command continues it; finished trials are never
repeated. A trial whose process died (SIGKILL, a crashed machine) is marked failed and its parameters are
queued as a new trial (a new folder; the dead trial's folder is kept with ``trial.json`` saying so): found
at once on this machine (its process is gone and its run folder unlocked), elsewhere by Optuna's heartbeat
after ``GRACE_S`` seconds. Ctrl-C stops the running trials at a checkpoint; they are queued again too.
Several worker processes share the storage (``workers``); many machines share a database URL.
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from . import rundir
from .errors import CifarlabError, short_repr
from .fsutil import atomic_write_bytes, atomic_write_json

KINDS = ("float", "log", "int", "intlog", "choice")
PRUNERS = ("hyperband", "halving", "median", "none")
# The validation images must be the same for every trial, or their accuracies do not compare.
NOT_SEARCHABLE = {"val_split": "it decides which images validate; every trial must be judged on the same ones",
                  "seed": "it also picks the held-out validation images; every trial must be judged on the same "
                          "ones (repeat a finished search with another --seed instead)",
                  "init_from": "a path, not a hyperparameter"}
MAX_CHOICES = 64
MAX_PARAMS = 32
HEARTBEAT_S, GRACE_S = 20, 60
MAX_RETRIES = 3  # how often a dead trial's parameters are queued again
SPACE_FILE_BYTES = 1 << 20
STUDY_ATTR = "cifarlab_sweep"


class SweepError(CifarlabError):
    """A search space, storage or study that cannot be used as asked."""


# ---------------------------------------------------------------------------------------------------
# The search space: recipe fields with a range or choices


@dataclass(frozen=True)
class Param:
    name: str  # a Recipe field
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()

    def describe(self) -> str:
        """The --param form: ``log:0.001:0.1``, ``choice:sgd,adamw``."""
        if self.kind == "choice":
            return "choice:" + ",".join(json.dumps(v) if isinstance(v, bool) else str(v) for v in self.values)
        return f"{self.kind}:{self.low:g}:{self.high:g}"

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.kind == "intlog")
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.kind == "log")

    def log_scale(self) -> bool:
        return self.kind in ("log", "intlog")


def _recipe_fields() -> dict:
    from .recipes import Recipe

    return {f.name: f for f in fields(Recipe)}


def _field_type(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _value(text, f, where: str):
    """A --param value as the field's type (JSON values are already typed; text is converted)."""
    kind = _field_type(f)
    if not isinstance(text, str) or kind == "str":
        return text
    try:
        if kind == "bool":
            return {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}[text.lower()]
        return int(text) if kind == "int" else float(text)
    except (KeyError, ValueError):
        raise SweepError(f"{where}: {short_repr(text, 40)} is not a {kind} value for {f.name}") from None


def parse_param(text: str, where: str = "--param") -> Param:
    """``NAME=KIND:LOW:HIGH`` or ``NAME=choice:A,B,C``; NAME may use '-' or '_' (``batch-size``)."""
    name, sep, spec = str(text).partition("=")
    if not sep or not name.strip():
        raise SweepError(f"{where} {short_repr(text, 60)}: expected NAME=KIND:..., e.g. lr=log:1e-3:1e-1 or "
                         f"optimizer=choice:sgd,adamw")
    return param_from(name.strip().replace("-", "_"), spec, f"{where} {short_repr(text, 60)}")


def param_from(name: str, spec, where: str) -> Param:
    """One parameter from its --param text (``log:1e-3:1e-1``) or JSON object form
    (``{"type": "log", "low": 0.001, "high": 0.1}``, ``{"type": "choice", "values": [...]}``)."""
    if isinstance(spec, str):
        kind, _, rest = spec.partition(":")
        if kind == "choice":
            raw = {"type": kind, "values": rest.split(",") if rest else []}
        else:
            bounds = rest.split(":")
            if len(bounds) != 2:
                raise SweepError(f"{where}: expected {kind or 'KIND'}:LOW:HIGH (kinds: {', '.join(KINDS)})")
            raw = {"type": kind, "low": bounds[0], "high": bounds[1]}
    elif isinstance(spec, dict):
        raw = spec
    else:
        raise SweepError(f"{where}: expected a string like \"log:1e-3:1e-1\" or an object with \"type\"")
    return check_param(name, raw, where)


def check_param(name: str, raw: dict, where: str) -> Param:
    """Types, bounds and choices from the Recipe field (its own bounds and choices), before any trial."""
    recipe_fields = _recipe_fields()
    if name not in recipe_fields:
        import difflib

        close = difflib.get_close_matches(name, recipe_fields, n=3)
        raise SweepError(f"{where}: {short_repr(name, 40)} is not a recipe field"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + "; the recipe's fields are the training options of cifarlab train.")
    if name in NOT_SEARCHABLE:
        raise SweepError(f"{where}: {name} cannot be searched: {NOT_SEARCHABLE[name]}.")
    f = recipe_fields[name]
    kind, ftype = raw.get("type"), _field_type(f)
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    if kind not in KINDS:
        raise SweepError(f"{where}: type {short_repr(kind, 20)} is not one of {', '.join(KINDS)}")
    if set(raw) - allowed:
        raise SweepError(f"{where}: unknown key(s) {sorted(set(raw) - allowed)}; allowed: {sorted(allowed)}")
    if kind == "choice":
        return _check_choice(name, f, raw.get("values"), where)
    numeric = "float" if kind in ("float", "log") else "int"
    if ftype != numeric:
        hint = "choice:..." if ftype in ("str", "bool") else ("int:LOW:HIGH" if ftype == "int" else "float or log")
        raise SweepError(f"{where}: {name} is a {ftype} field; use {hint}")
    low, high = (_number(raw.get(k), numeric, f"{where}: {k}") for k in ("low", "high"))
    lo, hi = f.metadata.get("bounds") or (-math.inf, math.inf)
    if not low < high:
        raise SweepError(f"{where}: low {low:g} must be below high {high:g}")
    if low < lo or high > hi:
        raise SweepError(f"{where}: {name} must stay within {lo:g}..{hi:g} (the recipe field's bounds)")
    if kind in ("log", "intlog") and low <= 0:
        raise SweepError(f"{where}: a log range needs low > 0, not {low:g}")
    return Param(name, kind, low, high)


def _number(value, numeric: str, where: str):
    if isinstance(value, str):
        try:
            value = float(value) if numeric == "float" else int(value)
        except ValueError:
            raise SweepError(f"{where} {short_repr(value, 30)} is not {'a number' if numeric == 'float' else 'an integer'}") \
                from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or numeric == "int" and not float(value).is_integer():
        raise SweepError(f"{where} must be a finite {'number' if numeric == 'float' else 'integer'}, not "
                         f"{short_repr(value, 30)}")
    return float(value) if numeric == "float" else int(value)


def _check_choice(name: str, f, values, where: str) -> Param:
    from .recipes import check_field

    if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
        raise SweepError(f"{where}: choice needs 1 to {MAX_CHOICES} values")
    typed = tuple(_value(v, f, where) for v in values)
    for v in typed:
        try:
            check_field(f, v)
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
    if len(set(map(repr, typed))) != len(typed):
        raise SweepError(f"{where}: the choices repeat a value")
    return Param(name, "choice", values=typed)


def load_space(path: str | Path) -> dict[str, Param]:
    """A search space file: ``{"params": {"lr": "log:1e-3:1e-1", "optimizer": {"type": "choice", "values":
    ["sgd", "adamw"]}}}`` (optionally a "description" string), read through every check of the tool."""
    from .validation import load_json_file

    data = load_json_file(path, "search space", SweepError, max_bytes=SPACE_FILE_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise SweepError(f"{path}: expected an object with a non-empty \"params\" object, e.g. "
                         f"{{\"params\": {{\"lr\": \"log:1e-3:1e-1\"}}}}")
    unknown = set(data) - {"params", "description"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: description, params")
    if len(data["params"]) > MAX_PARAMS:
        raise SweepError(f"{path}: {len(data['params'])} parameters is more than the {MAX_PARAMS} allowed")
    return {name: param_from(name, spec, f"{path}: params.{name}") for name, spec in data["params"].items()}


def build_space(params: list[str], space_file: str | Path | None, base) -> dict[str, Param]:
    """The --space file's parameters and the --param options (a name given twice is an error), each checked
    with the base recipe at its ends and choices (a range the recipe refuses fails now, not in trial 12)."""
    space = load_space(space_file) if space_file else {}
    for text in params:
        p = parse_param(text)
        if p.name in space:
            raise SweepError(f"--param {p.name}: searched twice (in --space or another --param)")
        space[p.name] = p
    if not space:
        raise SweepError("nothing to search: give --param NAME=KIND:... (e.g. --param lr=log:1e-3:1e-1) or --space "
                         "FILE.json")
    if len(space) > MAX_PARAMS:
        raise SweepError(f"{len(space)} parameters is more than the {MAX_PARAMS} allowed")
    for p in space.values():
        for v in (p.values if p.kind == "choice" else (p.low, p.high)):
            try:
                replace(base, **{p.name: v}).validate()
            except (ValueError, CifarlabError) as e:
                raise SweepError(f"--param {p.name}={p.describe()}: with {p.name} = {v!r} the recipe is refused: "
                                 f"{e}") from None
    return space


# ---------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class DataRequest:
    """How every worker loads the same data: the dataset entry (as a checkpoint stores it), the training
    subset, and the identity of the images (checked in each worker)."""
    entry: dict
    data_dir: str | None = None
    train_subset: int | None = None
    identity: dict = field(default_factory=dict)

    @classmethod
    def of(cls, data, data_dir=None, train_subset: int | None = None) -> "DataRequest":
        return cls(entry=data.describe(), data_dir=None if data_dir is None else str(data_dir),
                   train_subset=train_subset, identity=_identity(subset(data, train_subset)))

    def load(self):
        from .data import load_stored

        data = subset(load_stored(self.entry, data_dir=self.data_dir, download=False, progress=False),
                      self.train_subset)
        if _identity(data) != self.identity:
            raise SweepError(f"the data {self.entry.get('spec')} changed while the sweep ran (other images than "
                             f"the sweep started with); every trial must train on the same data.")
        return data


def subset(data, train_subset: int | None):
    if not train_subset:
        return data
    if train_subset > len(data.train):
        raise SweepError(f"--train-subset {train_subset} is more than the {len(data.train):,} training images of "
                         f"{data.spec}")
    return data.with_train(data.train.subset(slice(0, train_subset)), f"first {train_subset}")


def _identity(data) -> dict:
    ident = rundir.data_identity(data)
    return {k: ident.get(k) for k in ("name", "classes", "image_shape", "train_images", "train_sha256")}


@dataclass
class Sweep:
    """Everything a worker needs (picklable: workers are started as new processes)."""
    folder: Path
    space: dict[str, Param]
    recipe: object  # the Recipe every trial starts from (budget not yet applied)
    explicit: frozenset  # recipe fields given on the command line (the budget keeps them)
    data: DataRequest
    trials: int = 20
    timeout: float | None = None
    study_name: str = ""
    storage: str = ""
    workers: int = 1
    pruner: str = "hyperband"
    sampler_seed: int = 0
    threads: int | None = None
    device: str | None = None
    precision: str = "auto"

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.study_name = self.study_name or self.folder.resolve().name
        self.storage = self.storage or default_storage(self.folder)
        require_validation_split(self.recipe)

    def identity(self) -> dict:
        """What must stay the same when the study is continued."""
        return {"space": {n: p.describe() for n, p in sorted(self.space.items())},
                "recipe": asdict(self.recipe), "data": dict(self.data.identity, spec=self.data.entry.get("spec"),
                                                            train_subset=self.data.train_subset),
                "objective": f"final validation accuracy on {self.recipe.val_split} held-out training images"}


def require_validation_split(recipe) -> None:
    if not getattr(recipe, "val_split", 0):
        raise SweepError("a sweep needs --val-split N: the trials are compared on N images held out of the "
                         "training set, never on the test set (that would tune the model on the images it is "
                         "judged on).")


def default_storage(folder: Path) -> str:
    return f"sqlite:///{Path(os.path.abspath(folder)) / 'study.db'}"


def _quiet_optuna():
    import optuna

    # Optuna logs a failed trial's traceback as a warning: the sweep prints its own one-line account.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(url: str):
    import inspect

    optuna = _quiet_optuna()
    if url.startswith("sqlite:///"):
        _check_sqlite_file(Path(url[len("sqlite:///"):]))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}  # workers wait for the lock
    stale = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
             in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, **{stale: retry_trial})
    except Exception as e:  # SQLAlchemy's and Optuna's errors: an unusable URL or database
        raise SweepError(f"--storage {short_repr(_redact(url), 80)}: cannot open it ({_first_line(e)})") from None


def _redact(url: str) -> str:
    """A database URL without its password (it goes into error messages)."""
    scheme, sep, rest = url.partition("://")
    user, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{user.split(':')[0]}:***@{host}" if at and ":" in user else url


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _check_sqlite_file(path: Path) -> None:
    """The study database before SQLite opens it: a regular file that is an SQLite database (a FIFO would
    hang, another file would be reported deep inside SQLAlchemy)."""
    from .validation import check_regular_file

    if not os.path.lexists(path):
        if not path.parent.is_dir():
            raise SweepError(f"{path}: its folder {path.parent} does not exist.")
        return
    size = check_regular_file(path, 1 << 40, "study database", SweepError)
    if size:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise SweepError(f"{path}: not an SQLite database; choose another --storage or SWEEP_DIR.")


def open_study(sweep: Sweep, sampler_seed: int | None = None, create: bool = False):
    """The study in the sweep's storage (created if ``create``); its recorded identity must match."""
    optuna = _quiet_optuna()
    storage = _storage(sweep.storage)
    sampler = optuna.samplers.TPESampler(seed=sweep.sampler_seed)
    try:
        if create:
            study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction="maximize",
                                        sampler=sampler, pruner=make_pruner(sweep), load_if_exists=True)
        else:
            study = optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=sampler,
                                      pruner=make_pruner(sweep))
    except (CifarlabError, KeyError):
        raise
    except Exception as e:
        raise SweepError(f"--storage {short_repr(_redact(sweep.storage), 80)}: cannot open the study "
                         f"{sweep.study_name!r} ({_first_line(e)})") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SweepError(f"the study {sweep.study_name!r} in {_redact(sweep.storage)} is not a cifarlab sweep "
                         f"(it minimizes); choose another --study-name.")
    _check_identity(study, sweep, create)
    # A continued study must not draw the same parameters again: the seed moves on with the trials it holds.
    base = sweep.sampler_seed if sampler_seed is None else sampler_seed
    study.sampler = optuna.samplers.TPESampler(seed=(base + 7919 * len(study.trials)) % 2 ** 32)
    return study


def _check_identity(study, sweep: Sweep, create: bool) -> None:
    mine = json.loads(json.dumps(sweep.identity()))
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        if create and not study.trials:
            study.set_user_attr(STUDY_ATTR, mine)
            return
        raise SweepError(f"the study {sweep.study_name!r} in {_redact(sweep.storage)} was not made by cifarlab "
                         f"sweep; choose another --study-name or SWEEP_DIR.")
    if not isinstance(stored, dict):
        raise SweepError(f"the study {sweep.study_name!r}: its recorded sweep is damaged (not an object).")
    differences = [f"{key} {short_repr(stored.get(key), 120)} (started) vs {short_repr(mine[key], 120)} (now)"
                   for key in mine if stored.get(key) != mine[key]]
    if differences:
        raise SweepError(f"the study {sweep.study_name!r} was started with another " + "; ".join(differences[:3])
                         + ". Re-run it with the options it was started with (only --trials, --timeout, --workers "
                           "and --pruner may change), or search in another SWEEP_DIR.")


def make_pruner(sweep: Sweep):
    optuna = _quiet_optuna()
    epochs = max(1, int(sweep.recipe.epochs))
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if sweep.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------------
# Trials: the folder, the record, dead ones queued again


def trial_dir(folder: Path, number: int) -> Path:
    return Path(folder) / f"trial-{number:04d}"


def retry_trial(study, trial) -> None:
    """Queue a dead trial's parameters as a new trial (Optuna's heartbeat calls this for trials of other
    machines; :func:`release_dead_trials` for this machine's)."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        return
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={"failed_trial": history[0], "retry_history": history}))


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_trials(study, folder: Path, log=print) -> list[int]:
    """Running trials of this machine whose process is gone and whose run folder nobody holds: marked
    failed, their parameters queued again, their folder's trial.json updated. (Other machines' dead trials
    are found by the heartbeat, after GRACE_S seconds.)"""
    import optuna

    host, released = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tag = str(t.user_attrs.get("worker", ""))
        where, _, pid = tag.rpartition(":")
        if where != host or not pid.isdigit() or _alive(int(pid)) or rundir.lock_holder(trial_dir(folder, t.number)):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "error", "killed: its process ended mid-trial")
            if not study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker released it first
        retry_trial(study, study._storage.get_trial(t._trial_id))
        released.append(t.number)
        if os.path.isdir(trial_dir(folder, t.number)):
            _write_record(folder, t.number, t.params, "failed", None, None, "killed: its process ended mid-trial; "
                          "its parameters were queued as a new trial")
        log(f"trial {t.number}: its process ended mid-trial (killed); marked failed, parameters queued again")
    return released


def finished_trials(trials) -> list:
    """Trials that count towards --trials: complete, pruned, or failed by their parameters; not the dead
    ones that were queued again."""
    import optuna

    states = optuna.trial.TrialState
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)
            or t.state == states.FAIL and t.number not in retried]


def _enough(study, target: int) -> bool:
    import optuna

    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    return len(finished_trials(trials)) + len(running) >= target


def _write_record(folder: Path, number: int, params: dict, state: str, value, seconds, note: str = "") -> None:
    record = {"trial": number, "state": state, "val_acc": value, "seconds": seconds, "params": params}
    if note:
        record["note"] = note
    atomic_write_json(trial_dir(folder, number) / "trial.json", record)


def final_accuracy(history: list[dict], recipe) -> float:
    """The final model's validation accuracy: the last epoch's, or the best epoch's when early stopping
    restored its weights."""
    accuracies = [row["val_acc"] for row in history if "val_acc" in row]
    if not accuracies:
        raise SweepError("the trial finished without a validation accuracy")
    return max(accuracies) if recipe.early_stop else accuracies[-1]


def run_trial(trial, sweep: Sweep, data, log=print) -> float:
    """The objective: one normal run folder trained with the trial's parameters; its final validation
    accuracy. Raises optuna.TrialPruned when the pruner stopped it."""
    import optuna

    from .budget import fit_budget
    from .train import RunOptions, TrainingInterrupted, train
    from .train.callbacks.pruning import PRUNED_FILE

    trial.set_user_attr("worker", _worker_tag())
    params = {name: p.suggest(trial) for name, p in sweep.space.items()}
    run_dir = trial_dir(sweep.folder, trial.number)
    recipe, _ = fit_budget(replace(sweep.recipe, **params).validate(), len(data.train),
                           explicit=set(sweep.explicit) | set(params))
    options = RunOptions(device=sweep.device, precision=sweep.precision, threads=sweep.threads, progress=False,
                         diagnose=False, keep_checkpoints=1, trial=trial)
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in params.items())
    started = time.perf_counter()
    try:
        result = train(recipe, data, run_dir, options, log=lambda *a, **k: None)
    except TrainingInterrupted:
        _write_record(sweep.folder, trial.number, params, "failed", None, None,
                      "interrupted; its parameters were queued again")
        retry_trial(trial.study, trial.study._storage.get_trial(trial._trial_id))
        raise
    except (CifarlabError, ValueError, RuntimeError) as e:  # diverged (NaN), too big for memory, refused
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        trial.set_user_attr("error", why)
        if run_dir.is_dir():
            _write_record(sweep.folder, trial.number, params, "failed", None, time.perf_counter() - started, why)
        log(f"trial {trial.number}: {shown} -> failed: {why}")
        raise
    seconds = time.perf_counter() - started
    if (run_dir / PRUNED_FILE).exists():
        epoch = len(result.history)
        accuracy = result.history[-1]["val_acc"]
        _write_record(sweep.folder, trial.number, params, "pruned", accuracy, seconds,
                      f"pruned after epoch {epoch} of {recipe.epochs}")
        log(f"trial {trial.number}: {shown} -> pruned after epoch {epoch} (val acc {accuracy:.4f}, {seconds:.1f} s)")
        raise optuna.TrialPruned(f"pruned after epoch {epoch}")
    accuracy = final_accuracy(result.history, recipe)
    _write_record(sweep.folder, trial.number, params, "complete", accuracy, seconds)
    log(f"trial {trial.number}: {shown} -> val acc {accuracy:.4f} ({seconds:.1f} s)")
    return accuracy


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_worker(sweep: Sweep, index: int = 0, data=None, log=print) -> None:
    """One worker: trials until the study holds ``sweep.trials`` finished ones (or the timeout passes)."""
    import torch

    from .train import TrainingInterrupted

    optuna = _quiet_optuna()
    threads = sweep.threads or max(1, (os.cpu_count() or 1) // sweep.workers)
    torch.set_num_threads(threads)
    sweep = replace(sweep, threads=threads)
    if data is None:
        data = sweep.data.load()
    # Each worker's sampler gets its own seed: the same seed would propose the same first trials in each.
    study = open_study(sweep, sampler_seed=sweep.sampler_seed + 1_000_003 * index)
    deadline = None if sweep.timeout is None else time.monotonic() + sweep.timeout
    catch = (CifarlabError, ValueError, RuntimeError)
    while True:
        release_dead_trials(study, sweep.folder, log)
        if _enough(study, sweep.trials) or deadline is not None and time.monotonic() >= deadline:
            return
        try:
            study.optimize(lambda trial: run_trial(trial, sweep, data, log), n_trials=1, catch=catch)
        except TrainingInterrupted:
            raise KeyboardInterrupt from None


def _worker_main(sweep: Sweep, index: int) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, its own data and threads)."""
    import sys

    prefix = f"[worker {index}] "

    def log(*parts, **kwargs):
        print(prefix + " ".join(map(str, parts)), flush=True)

    try:
        run_worker(sweep, index, log=log)
    except KeyboardInterrupt:
        sys.exit(130)
    except CifarlabError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_trial_folders(study, folder: Path) -> None:
    """Trial folders the study does not know belong to another study: refuse rather than train into them."""
    known = {t.number for t in study.get_trials(deepcopy=False)}
    strangers = sorted(p.name for p in Path(folder).glob("trial-*")
                       if p.name[6:].isdigit() and int(p.name[6:]) not in known)
    if strangers:
        raise SweepError(f"{folder} holds trial folders that the study {study.study_name!r} does not know "
                         f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}): another study's "
                         f"(a different --study-name or --storage, or a deleted study.db). Use the options it was "
                         f"started with, or another SWEEP_DIR.")


def run_sweep(sweep: Sweep, data, log=print) -> dict:
    """Create or continue the study, run its workers (``sweep.workers`` processes; one runs in this
    process), then write ``trials.csv`` and ``search.png``. Returns the summary (see :func:`summarize`).
    Raises KeyboardInterrupt after Ctrl-C (the running trials are queued again)."""
    try:
        sweep.folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweepError(f"{sweep.folder}: cannot create the sweep folder ({e.strerror or e}).") from None
    study = open_study(sweep, create=True)
    check_trial_folders(study, sweep.folder)
    atomic_write_json(sweep.folder / "sweep.json", dict(sweep.identity(), study_name=sweep.study_name,
                                                        storage=_redact(sweep.storage)))
    before = len(finished_trials(study.get_trials(deepcopy=False)))
    if before:
        log(f"continuing the study {sweep.study_name!r}: {before} of {sweep.trials} trials finished")
    if sweep.workers == 1:
        run_worker(sweep, 0, data, log)
    else:
        _run_processes(sweep, log)
    return summarize(open_study(sweep), sweep, log)


def _run_processes(sweep: Sweep, log) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(sweep, i), name=f"sweep-worker-{i}")
                 for i in range(sweep.workers)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them checkpoint and queue their trials
        for p in processes:
            p.join()
        raise
    failed = [p for p in processes if p.exitcode not in (0, None)]
    if any(p.exitcode == 130 for p in failed):
        raise KeyboardInterrupt
    if failed:
        raise SweepError(f"{len(failed)} of {len(processes)} worker processes failed (exit codes "
                         f"{', '.join(str(p.exitcode) for p in failed)}); see their messages above.")


# ---------------------------------------------------------------------------------------------------
# Results: the table, the CSV, the plot


def trial_rows(study, sweep: Sweep) -> list[dict]:
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried_as = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])[-1:]}
    rows = []
    for t in trials:
        if t.state == states.WAITING:
            continue
        value = t.value if t.state == states.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        state = t.state.name.lower()
        if t.state == states.PRUNED and t.intermediate_values:
            state = f"pruned@{max(t.intermediate_values)}"
        elif t.state == states.FAIL:
            state = f"killed, rerun as {retried_as[t.number]}" if t.number in retried_as else "failed"
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start and t.number not in retried_as else None  # (died: unknown)
        rows.append({"trial": t.number, "state": state, "val_acc": value, "seconds": seconds,
                     "params": dict(t.params), "error": t.user_attrs.get("error", ""),
                     "run_dir": str(trial_dir(sweep.folder, t.number))})
    return rows


def table(rows: list[dict], names: list[str], limit: int | None = None) -> str:
    """The rows as aligned text, best validation accuracy first."""
    ranked = sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), r["trial"]))[:limit]
    header = ["trial", *names, "val acc", "state", "seconds"]
    body = [[str(r["trial"]), *(_fmt(r["params"].get(n, "")) for n in names),
             "" if r["val_acc"] is None else f"{r['val_acc']:.4f}", r["state"],
             "" if r["seconds"] is None else f"{r['seconds']:.1f}"] for r in ranked]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body])


def write_csv(rows: list[dict], names: list[str], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "val_acc", "seconds", *names, "run_dir", "error"])
    for r in sorted(rows, key=lambda r: r["trial"]):
        writer.writerow([r["trial"], r["state"], "" if r["val_acc"] is None else f"{r['val_acc']:.6f}",
                         "" if r["seconds"] is None else f"{r['seconds']:.2f}",
                         *(r["params"].get(n, "") for n in names), r["run_dir"], r["error"]])
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


def plot_search(rows: list[dict], sweep: Sweep, path: Path) -> Path:
    """Left: each trial's validation accuracy in the order they ran, and the best so far. Then one panel
    per searched parameter (up to 4): accuracy against its value (log axis for log ranges)."""
    from . import plots

    plt = plots.pyplot()
    from matplotlib import ticker

    shown = list(sweep.space.values())[:4]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(5 * (1 + len(shown)), 4), squeeze=False)
    ordered = sorted(rows, key=lambda r: r["trial"])
    done = [r for r in ordered if r["val_acc"] is not None]
    complete = [r for r in done if r["state"] == "complete"]
    pruned = [r for r in done if r["state"].startswith("pruned")]
    ax = axes[0][0]
    ax.plot([r["trial"] for r in complete], [r["val_acc"] for r in complete], "o", label="complete")
    ax.plot([r["trial"] for r in pruned], [r["val_acc"] for r in pruned], "x", color="grey",
            label="pruned (last epoch reported)")
    best, xs, ys = -1.0, [], []
    for r in complete:
        best = max(best, r["val_acc"])
        xs.append(r["trial"])
        ys.append(best)
    if xs:  # the best so far, carried on to the last trial
        ax.step([*xs, ordered[-1]["trial"]], [*ys, ys[-1]], where="post", color="C1", label="best so far")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel="validation accuracy", title=plots.label(f"sweep {sweep.study_name}"))
    ax.legend(loc="lower right", fontsize=8)
    for ax, p in zip(axes[0][1:], shown):
        for group, marker, color in ((complete, "o", "C0"), (pruned, "x", "grey")):
            values = [r["params"].get(p.name) for r in group]
            keep = [(v, r["val_acc"]) for v, r in zip(values, group) if v is not None]
            if p.kind == "choice":
                labels = [str(v) for v in p.values]
                ax.plot([labels.index(str(v)) for v, _ in keep], [a for _, a in keep], marker, color=color)
                ax.set_xticks(range(len(labels)), [plots.label(v, 12) for v in labels])
            else:
                ax.plot([v for v, _ in keep], [a for _, a in keep], marker, color=color)
        if p.log_scale():  # plain numbers: the default log labels are mathtext, which plots.pyplot turns off
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel=plots.label(p.name), ylabel="validation accuracy")
    return plots.save_figure(fig, path)


def summarize(study, sweep: Sweep, log=print) -> dict:
    rows = trial_rows(study, sweep)
    names = list(sweep.space)
    files = {"csv": write_csv(rows, names, sweep.folder / "trials.csv")}
    if any(r["val_acc"] is not None for r in rows):
        files["plot"] = plot_search(rows, sweep, sweep.folder / "search.png")
    counts = {}
    for r in rows:
        key = r["state"].split("@")[0].split(",")[0]
        counts[key] = counts.get(key, 0) + 1
    log(f"\n{len(rows)} trials ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); best first:")
    log(table(rows, names, limit=10))
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["val_acc"]) if complete else None
    if best:
        log(f"\nbest: trial {best['trial']}, validation accuracy {best['val_acc']:.4f} on "
            f"{sweep.recipe.val_split} held-out training images; run folder {best['run_dir']}")
        log("its options: " + " ".join(f"--{k.replace('_', '-')} {_fmt(v)}" for k, v in best["params"].items()))
    log("table: " + str(files["csv"]) + ("; plot: " + str(files["plot"]) if "plot" in files else ""))
    return {"rows": rows, "best": best, "files": files}
