"""One validation layer for everything cifarlab reads back from disk.

Files: :func:`read_bounded` opens without blocking, checks that the path is a regular file (not a FIFO,
a device such as ``/dev/urandom`` behind a symlink, a socket or a folder) and that its size is within a
limit, and only then reads it. JSON: :func:`parse_json` decodes UTF-8 (naming the file otherwise),
refuses NaN/Infinity literals and bounds the nesting depth (200,000 nested lists are an error, not a
RecursionError). Schemas: :func:`check_meta` (a checkpoint's meta.json), :func:`check_train_state`
(the training-state header and its RNG tensor), :func:`check_results` (``eval/results.json``), each
naming the field that is wrong and why: types, bounds, finite numbers.

:func:`meta_sha256` is the metadata's own checksum (the weights have had one all along), stored inside
the metadata, so a meta.json edited after it was written is detected.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path

from .errors import CifarlabError, short_repr

MAX_JSON_BYTES = 64 * 1024 ** 2  # meta.json / results.json: a history of 10,000 epochs is about 2 MB
MAX_JSON_DEPTH = 64               # a declaration nests 4 deep, a checkpoint's metadata 6
MAX_CLASSES = 100_000
# Any folder name a file system allows (255 bytes) in its printable form (4 characters for a byte that is
# not UTF-8); data loading refuses longer names before a run starts (cifarlab.data.base.check_class_names).
MAX_CLASS_NAME = 1024
MAX_EPOCHS = 10_000
MAX_STEPS = 10 ** 12
META_SHA_KEY = "meta_sha256"
STATE_SHA_KEY = "train_state_sha256"


class ValidationError(CifarlabError):
    """A file read from disk that is not what cifarlab wrote (damaged, edited, hostile)."""


# ---------------------------------------------------------------------------------------------------
# Files


def read_bounded(path: str | Path, max_bytes: int, what: str = "file", error=ValidationError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is a one-line ``error``.

    Opened with O_NONBLOCK (a FIFO never blocks the open) and checked with fstat on the open
    descriptor, so the file checked is the file read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing.") from None
    except OSError as e:
        raise error(f"{path}: cannot open the {what} ({e.strerror or e}).") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: the {what} is not a regular file (it is {_kind(st.st_mode)}); refusing to "
                        f"read it.")
        if st.st_size > max_bytes:
            raise error(f"{path}: the {what} is {_size(st.st_size)}, more than the {_size(max_bytes)} it may "
                        f"be; refusing to read it.")
        chunks, left = [], max_bytes + 1
        while left > 0:
            try:
                chunk = os.read(fd, min(left, 1 << 24))
            except BlockingIOError:  # only for non-regular files, which were refused above
                raise error(f"{path}: the {what} cannot be read without blocking.") from None
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # it grew while being read
            raise error(f"{path}: the {what} grew past {_size(max_bytes)} while being read; refusing it.")
        return data
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e}).") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def check_regular_file(path: str | Path, max_bytes: int, what: str = "file", error=ValidationError) -> int:
    """stat-level check (no read): the path is a regular file of at most ``max_bytes``; returns its size."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing.") from None
    except OSError as e:
        raise error(f"{path}: cannot inspect the {what} ({e.strerror or e}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: the {what} is not a regular file (it is {_kind(st.st_mode)}); refusing to read it.")
    if st.st_size > max_bytes:
        raise error(f"{path}: the {what} is {_size(st.st_size)}, more than the {_size(max_bytes)} it may be; "
                    f"refusing to read it.")
    return st.st_size


def os_error_message(e: OSError, path) -> str:
    """An OSError as one line that names the file (ENOSPC's '[Errno 28]' alone names nothing)."""
    where = e.filename or path
    text = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        text += " (the disk is full: free some space and try again)"
    return f"{where}: {text}"


# ---------------------------------------------------------------------------------------------------
# JSON


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(data: bytes | str, source, error=ValidationError, max_depth: int = MAX_JSON_DEPTH):
    """JSON text or UTF-8 bytes -> a value; any problem is one ``error`` naming ``source``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{source}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); the file is "
                        f"damaged or not cifarlab's.") from None
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply (more than {max_depth} levels); the file is damaged or "
                    f"hostile.") from None
    except ValueError as e:
        raise error(f"{source}: not valid JSON ({short_repr(str(e), 120)}).") from None
    depth = json_depth(value, max_depth)
    if depth > max_depth:
        raise error(f"{source}: JSON nested too deeply (more than {max_depth} levels); the file is damaged or "
                    f"hostile.")
    return value


def json_depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON value (iterative; stops counting past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def meta_sha256(meta: dict) -> str:
    """Checksum of a checkpoint's metadata, excluding the checksum itself. Taken over the value as JSON
    gives it back (tuples as lists, keys as strings), so writer and reader agree."""
    return state_sha256({k: v for k, v in meta.items() if k != META_SHA_KEY})


def state_sha256(state: dict) -> str:
    return hashlib.sha256(canonical_json(json.loads(json.dumps(state)))).hexdigest()


# ---------------------------------------------------------------------------------------------------
# A small schema checker: each helper names the field and what it must be


class _Checker:
    def __init__(self, source, error):
        self.source, self.error = source, error

    def fail(self, field: str, message: str):
        raise self.error(f"{self.source}: '{field}' {message}.")

    def dict(self, field: str, value, required: bool = True):
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, not {_type(value)}")
        return value

    def list(self, field: str, value, max_len: int | None = None):
        if not isinstance(value, list):
            self.fail(field, f"must be a list, not {_type(value)}")
        if max_len is not None and len(value) > max_len:
            self.fail(field, f"has {len(value):,} entries, more than {max_len:,}")
        return value

    def int(self, field: str, value, lo: int, hi: int):
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"must be an integer, not {_type(value)} {short_repr(value, 40)}")
        if not lo <= value <= hi:
            self.fail(field, f"= {value} is outside {lo}..{hi}")
        return value

    def number(self, field: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(field, f"must be a number, not {_type(value)} {short_repr(value, 40)}")
        if not math.isfinite(value):
            self.fail(field, f"must be a finite number, not {value}")
        if value < lo or value > hi or (lo_open and value == lo):
            self.fail(field, f"= {value} is outside {'(' if lo_open else '['}{lo}, {hi}]")
        return value

    def str(self, field: str, value, max_len: int = 1000, non_empty: bool = False):
        if not isinstance(value, str):
            self.fail(field, f"must be a string, not {_type(value)} {short_repr(value, 40)}")
        if len(value) > max_len or (non_empty and not value):
            self.fail(field, f"must be a {'non-empty ' if non_empty else ''}string of at most {max_len} characters")
        return value


def _type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------
# Schemas


def check_classes(c: _Checker, field: str, classes) -> list:
    c.list(field, classes, MAX_CLASSES)
    if not classes:
        c.fail(field, "must name at least one class")
    for i, name in enumerate(classes):
        c.str(f"{field}[{i}]", name, MAX_CLASS_NAME, non_empty=True)
    if len(set(classes)) != len(classes):
        dup = next(n for n in classes if classes.count(n) > 1)
        c.fail(field, f"names {dup!r} more than once; class names must be unique")
    return classes


def input_channels(architecture) -> int:
    """Input channels of a declaration (3 for CIFAR-10; a declaration may state its input shape)."""
    if isinstance(architecture, dict):
        shape = architecture.get("input_shape") or architecture.get("input")
        if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], int) and not isinstance(shape[0], bool):
            return shape[0]
    return 3


def check_normalization(c: _Checker, norm, channels: int = 3) -> dict:
    c.dict("normalization", norm)
    out = {}
    for key, lo_open in (("mean", False), ("std", True)):
        if key not in norm:
            c.fail(f"normalization.{key}", "is missing")
        values = c.list(f"normalization.{key}", norm[key], max_len=channels)
        if len(values) not in (1, channels):
            c.fail(f"normalization.{key}", f"must have 1 or {channels} values (one per channel), not {len(values)}")
        for i, v in enumerate(values):
            c.number(f"normalization.{key}[{i}]", v, *((0.0, 1e6, True) if key == "std" else (-1e6, 1e6)))
        out[key] = list(values) * channels if len(values) == 1 else list(values)
    return out


def check_meta(meta, source, error=ValidationError, expected_format: str | None = None) -> dict:
    """Validate a checkpoint's metadata; returns it with a one-value normalization spread over the channels.

    (The architecture declaration itself is validated by :func:`cifarlab.models.validate` when the model
    is rebuilt; here it must be an object.)"""
    c = _Checker(source, error)
    if not isinstance(meta, dict):
        raise error(f"{source}: the metadata must be a JSON object, not {_type(meta)}; not a cifarlab checkpoint.")
    if expected_format is not None and meta.get("format") != expected_format:
        raise error(f"{source}: not a cifarlab checkpoint (format {short_repr(meta.get('format'), 60)}), expected "
                    f"{expected_format!r}.")
    if "architecture" not in meta:
        raise error(f"{source}: metadata has no 'architecture' declaration.")
    c.dict("architecture", meta["architecture"])
    if "classes" not in meta:
        c.fail("classes", "is missing (the class names, in output order)")
    check_classes(c, "classes", meta["classes"])
    if "normalization" not in meta:
        c.fail("normalization", "is missing (mean and std per channel)")
    normalization = check_normalization(c, meta["normalization"], input_channels(meta["architecture"]))
    sha = meta.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha)):
        c.fail("weights_sha256", "must be 64 lowercase hex digits")
    if "recipe" in meta:
        c.dict("recipe", meta["recipe"])
    for key, hi in (("epoch", MAX_EPOCHS), ("step_in_epoch", MAX_STEPS), ("global_step", MAX_STEPS),
                    ("world_size", 1 << 20), ("seed", 2 ** 64)):
        if meta.get(key) is not None:
            c.int(key, meta[key], 0 if key != "world_size" else 1, hi)
    if meta.get("history") is not None:
        c.list("history", meta["history"], MAX_EPOCHS)
        for i, row in enumerate(meta["history"]):
            c.dict(f"history[{i}]", row)
            for k, v in row.items():
                if v is not None:
                    c.number(f"history[{i}].{k}", v)
    if meta.get("metrics") is not None:
        c.dict("metrics", meta["metrics"])
    for key in ("versions", "source", "data_identity"):
        if meta.get(key) is not None:
            c.dict(key, meta[key])
    for key in ("val_source", "precision", "format"):
        if meta.get(key) is not None:
            c.str(key, meta[key])
    if meta.get("train_seconds") is not None:
        c.number("train_seconds", meta["train_seconds"], 0.0)
    if meta.get("val_size") is not None:
        c.int("val_size", meta["val_size"], 0, 1 << 40)
    if meta.get("early_stopping") is not None:
        c.dict("early_stopping", meta["early_stopping"])
    if meta.get("diagnosis") is not None:  # the training doctor's findings: shown in the report as text
        for i, finding in enumerate(c.list("diagnosis", meta["diagnosis"], 100)):
            c.dict(f"diagnosis[{i}]", finding)
            c.str(f"diagnosis[{i}].text", finding.get("text"), max_len=4000)
    if meta.get("calibration") is not None:  # temperature scaling: predict/export divide logits by it
        c.dict("calibration", meta["calibration"])
        if meta["calibration"].get("temperature") is not None:
            c.number("calibration.temperature", meta["calibration"]["temperature"], 0.05, 20.0)
    return dict(meta, normalization=normalization) if normalization != meta["normalization"] else meta


CALLBACK_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
PARTIAL_KEYS = {"loss_sum": (0.0, math.inf), "correct": (0, MAX_STEPS * 65_536), "seen": (0, MAX_STEPS * 65_536),
                "seconds": (0.0, math.inf)}


def check_train_state(state, tensors: dict, source, error=ValidationError) -> dict:
    """The training-state header (position, optimizer, recipe) and the RNG tensor beside it."""
    c = _Checker(source, error)
    if not isinstance(state, dict):
        raise error(f"{source}: the training state must be a JSON object, not {_type(state)}.")
    for key in ("epoch", "step_in_epoch", "global_step"):
        if key not in state:
            c.fail(key, "is missing")
    c.int("epoch", state["epoch"], 0, MAX_EPOCHS)
    c.int("step_in_epoch", state["step_in_epoch"], 0, MAX_STEPS)
    c.int("global_step", state["global_step"], 0, MAX_STEPS)
    c.int("world_size", state.get("world_size", 1), 1, 1 << 20)
    if "recipe" in state:
        c.dict("recipe", state["recipe"])
    partial = c.dict("partial_epoch", state.get("partial_epoch", {}))
    for key, value in partial.items():
        if key not in PARTIAL_KEYS:
            c.fail(f"partial_epoch.{key}", f"is not one of {sorted(PARTIAL_KEYS)}")
        lo, hi = PARTIAL_KEYS[key]
        if isinstance(lo, int):
            c.int(f"partial_epoch.{key}", value, lo, hi)
        else:
            c.number(f"partial_epoch.{key}", value, lo, hi)
    opt = c.dict("optimizer", state.get("optimizer"))
    groups = c.list("optimizer.param_groups", opt.get("param_groups"), 1000)
    for i, g in enumerate(groups):
        c.dict(f"optimizer.param_groups[{i}]", g)
        c.list(f"optimizer.param_groups[{i}].params", g.get("params"), 1 << 20)
    c.dict("optimizer.plain", opt.get("plain"))
    rng = [k for k in tensors if k.startswith("rng.torch")]
    if not rng:
        raise error(f"{source}: the random-number generator state (tensor 'rng.torch.rank0') is missing; the "
                    f"training state is damaged.")
    import torch

    size = torch.get_rng_state().numel()
    for key in rng:
        t = tensors[key]
        if t.dtype != torch.uint8 or t.ndim != 1 or t.numel() != size:
            raise error(f"{source}: tensor {key!r} must be a uint8 vector of {size} values (a CPU RNG state), not "
                        f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}.")
    # Other tensors: the optimizer's ("PARAM_ID.SLOT") and each stateful callback's ("KEY.NAME", e.g.
    # "lookahead.conv1.weight", "ema.w.conv1.weight"); a callback checks its own values when it loads them.
    callbacks = c.dict("callbacks", state.get("callbacks", {}))
    for key, values in callbacks.items():
        if not CALLBACK_KEY.fullmatch(str(key)):
            c.fail(f"callbacks.{short_repr(key, 40)}", "is not a callback name")
        c.dict(f"callbacks.{key}", values)
    for key in tensors:
        if key.startswith("rng."):
            continue
        prefix, _, name = key.partition(".")
        if not name or not (prefix.isdigit() or CALLBACK_KEY.fullmatch(prefix)):
            raise error(f"{source}: unexpected tensor {short_repr(key, 60)} in the training state.")
    return state


def check_position(state: dict, epochs: int, steps_per_epoch: int, source, error=ValidationError) -> None:
    """The saved position must lie inside this run: 0 <= epoch <= epochs, step < steps per epoch, and
    global_step = epoch x steps per epoch + step."""
    epoch, step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    if epoch > epochs or step >= steps_per_epoch or (epoch == epochs and step) \
            or global_step != epoch * steps_per_epoch + step:
        raise error(f"{source}: saved position epoch {epoch}, step {step}, global step {global_step} does not fit "
                    f"a run of {epochs} epochs x {steps_per_epoch} steps; the training state is damaged.")


def check_results(results, source, error=ValidationError) -> dict:
    """``eval/results.json`` as written by :func:`cifarlab.pipeline.evaluate_to_folder`."""
    c = _Checker(source, error)
    if not isinstance(results, dict):
        raise error(f"{source}: evaluation results must be a JSON object, not {_type(results)}.")
    for key in ("accuracy", "loss", "num_images", "classes", "per_class_accuracy", "checkpoint"):
        if key not in results:
            c.fail(key, "is missing")
    c.number("accuracy", results["accuracy"], 0.0, 1.0)
    c.number("loss", results["loss"], 0.0)
    n = c.int("num_images", results["num_images"], 0, 10 ** 9)
    classes = check_classes(c, "classes", results["classes"])
    per_class = c.dict("per_class_accuracy", results["per_class_accuracy"])
    if set(per_class) != set(classes):
        c.fail("per_class_accuracy", "must have one entry per class")
    for name, v in per_class.items():
        c.number(f"per_class_accuracy.{name}", v, 0.0, 1.0)
    c.str("checkpoint", results["checkpoint"], 4096)
    if results.get("architecture") is not None:
        c.str("architecture", results["architecture"])
    if results.get("tta") is not None:
        c.int("tta", results["tta"], 0, 2)
    if results.get("tta_below") is not None:
        c.number("tta_below", results["tta_below"], 0.0, 1.0)
    if results.get("epoch") is not None:
        c.int("epoch", results["epoch"], 0, MAX_EPOCHS)
    if results.get("weights_sha256") is not None:
        c.str("weights_sha256", results["weights_sha256"], 64)
    if "confusion_matrix" in results:
        rows = c.list("confusion_matrix", results["confusion_matrix"], len(classes))
        if len(rows) != len(classes):
            c.fail("confusion_matrix", f"must have {len(classes)} rows")
        for i, row in enumerate(rows):
            c.list(f"confusion_matrix[{i}]", row, len(classes))
            if len(row) != len(classes):
                c.fail(f"confusion_matrix[{i}]", f"must have {len(classes)} counts")
            for j, v in enumerate(row):
                c.int(f"confusion_matrix[{i}][{j}]", v, 0, n)
    for i, v in enumerate(c.list("gallery_indices", results.get("gallery_indices", []), 10_000)):
        c.int(f"gallery_indices[{i}]", v, 0, max(n - 1, 0))
    for i, m in enumerate(c.list("worst_mistakes", results.get("worst_mistakes", []), 10_000)):
        c.dict(f"worst_mistakes[{i}]", m)
        for key in ("index", "true", "predicted", "score"):
            if key not in m:
                c.fail(f"worst_mistakes[{i}].{key}", "is missing")
        c.int(f"worst_mistakes[{i}].index", m["index"], 0, max(n - 1, 0))
        c.str(f"worst_mistakes[{i}].true", m["true"], MAX_CLASS_NAME)
        c.str(f"worst_mistakes[{i}].predicted", m["predicted"], MAX_CLASS_NAME)
        c.number(f"worst_mistakes[{i}].score", m["score"], 0.0, 1.0)
    if results.get("per_class") is not None:  # precision / recall / F1 (the report's per-class quality)
        for name, q in c.dict("per_class", results["per_class"]).items():
            c.dict(f"per_class.{name}", q)
            for key in ("precision", "recall", "f1"):
                c.number(f"per_class.{name}.{key}", q.get(key), 0.0, 1.0)
    if results.get("calibration") is not None:
        cal = c.dict("calibration", results["calibration"])
        for side in ("before", "after"):
            if side == "before" or cal.get(side) is not None:
                c.dict(f"calibration.{side}", cal.get(side))
                for key in ("ece", "mce", "nll", "brier", "accuracy"):
                    c.number(f"calibration.{side}.{key}", cal[side].get(key), 0.0)
        if cal.get("temperature") is not None:
            c.number("calibration.temperature", cal["temperature"], 0.0, math.inf, lo_open=True)
    for i, sh in enumerate(c.list("shift", results.get("shift") or [], 100)):
        c.dict(f"shift[{i}]", sh)
        for key in ("accuracy", "reference_accuracy"):
            c.number(f"shift[{i}].{key}", sh.get(key), 0.0, 1.0)
        c.number(f"shift[{i}].gap", sh.get("gap"), -1.0, 1.0)
        for key in ("accuracy_ci95", "reference_ci95", "gap_ci95"):
            for j, v in enumerate(c.list(f"shift[{i}].{key}", sh.get(key), 2)):
                c.number(f"shift[{i}].{key}[{j}]", v, -1.0, 1.0)
        c.int(f"shift[{i}].num_images", sh.get("num_images"), 0, 10 ** 9)
    return results


def load_json_file(path: str | Path, what: str, error=ValidationError, max_bytes: int = MAX_JSON_BYTES):
    """A JSON file read through every check above (regular file, size, UTF-8, depth, no NaN)."""
    return parse_json(read_bounded(path, max_bytes, what, error), path, error)


SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _sha(c: _Checker, field: str, value, required: bool = True):
    if value is None and not required:
        return None
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        c.fail(field, "must be 64 lowercase hex digits")
    return value


def check_ood_bank_meta(info, source, error=ValidationError) -> dict:
    """The ``cifarlab_ood`` metadata of an OOD feature bank (``RUN/ood/bank.safetensors``, written by
    :func:`cifarlab.ood.save_bank`); the tensors themselves are checked by :func:`cifarlab.ood.load_bank`."""
    c = _Checker(source, error)
    if not isinstance(info, dict):
        raise error(f"{source}: the feature bank's metadata must be a JSON object, not {_type(info)}.")
    if info.get("format") != "cifarlab-ood-bank-2":
        c.fail("format", f"is {short_repr(info.get('format'), 40)}, not 'cifarlab-ood-bank-2'")
    _sha(c, "weights_sha256", info.get("weights_sha256"), required=False)
    _sha(c, "train_sha256", info.get("train_sha256"))
    _sha(c, "tensors_sha256", info.get("tensors_sha256"))
    if info.get("content_key") is not None:
        c.str("content_key", info["content_key"], 200)
    c.str("head", info.get("head"), 400, non_empty=True)
    c.int("count", info.get("count"), 1, 1 << 40)
    c.int("dim", info.get("dim"), 1, 1 << 20)
    c.int("k", info.get("k"), 1, 10_000)
    c.str("created", info.get("created"), 64)
    check_normalization(c, info.get("normalization"), len((info.get("normalization") or {}).get("mean") or [0, 0, 0]))
    holdout = c.dict("holdout", info.get("holdout"))
    c.int("holdout.count", holdout.get("count"), 1, 1 << 40)
    c.str("holdout.what", holdout.get("what"), 1000)
    c.int("layer_count", info.get("layer_count"), 1, 1 << 40)
    layers = info.get("layers")
    if not isinstance(layers, list) or len(layers) > 1000:
        c.fail("layers", "must be a list of at most 1,000 {name, dim} entries")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != {"name", "dim"}:
            c.fail(f"layers[{i}]", "must be an object with exactly 'name' and 'dim'")
        c.str(f"layers[{i}].name", entry["name"], 400, non_empty=True)
        c.int(f"layers[{i}].dim", entry["dim"], 1, 1 << 20)
    if len({entry["name"] for entry in layers}) != len(layers):
        c.fail("layers", "names a layer twice")
    return info


def check_ood_threshold(entry, source, error=ValidationError) -> dict:
    """``RUN/ood/threshold.json`` as written by :func:`cifarlab.ood.prepare`."""
    c = _Checker(source, error)
    if not isinstance(entry, dict):
        raise error(f"{source}: the OOD threshold must be a JSON object, not {_type(entry)}.")
    if entry.get("format") != "cifarlab-ood-threshold-2":
        c.fail("format", f"is {short_repr(entry.get('format'), 40)}, not 'cifarlab-ood-threshold-2'")
    if entry.get("score") != "layers":
        c.fail("score", "must be 'layers'")
    c.int("k", entry.get("k"), 1, 10_000)
    c.int("layer_k", entry.get("layer_k"), 1, 10_000)
    c.number("threshold", entry.get("threshold"), -1e9, 1e9)   # a min of z-scores
    c.number("knn_threshold", entry.get("knn_threshold"), -2.0, 0.0)
    standardize = c.dict("standardize", entry.get("standardize"))
    if not 1 <= len(standardize) <= 1001:
        c.fail("standardize", "must hold 1 to 1,001 layers")
    for name, pair in standardize.items():
        if not isinstance(pair, list) or len(pair) != 2:
            c.fail(f"standardize.{short_repr(name, 60)}", "must be [mean, sd]")
        c.number(f"standardize.{short_repr(name, 60)}[0]", pair[0], -2.0, 0.0)
        c.number(f"standardize.{short_repr(name, 60)}[1]", pair[1], 1e-9, 2.0)
    c.number("tpr", entry.get("tpr"), 0.0, 1.0, lo_open=True)
    c.number("accepted", entry.get("accepted"), 0.0, 1.0)
    c.int("fitted_on", entry.get("fitted_on"), 1, 1 << 40)
    c.str("fitted_on_what", entry.get("fitted_on_what"), 1000)
    _sha(c, "weights_sha256", entry.get("weights_sha256"), required=False)
    _sha(c, "bank_sha256", entry.get("bank_sha256"))
    return entry
