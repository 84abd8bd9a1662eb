"""Checkpoints: safetensors weights, JSON metadata, written atomically, verified on load.

A checkpoint is a folder::

    model.safetensors        weights; the metadata JSON is also embedded in its header, so the file
                             alone is enough to rebuild the model
    meta.json                architecture declaration, classes, normalization, epoch, metrics, seed,
                             versions, and the sha256 of the weights
    train_state.safetensors  optimizer tensors, with optimizer/RNG/data-order state in its header
                             (only for resumable training checkpoints)

The folder is written under a temporary name, every file fsynced, then renamed into place: a crash
leaves either the complete checkpoint or none. No pickle is ever loaded, except a ``.pt``/``.pth``
file the user explicitly allows, and then only with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from . import validation as V
from .errors import CheckpointError, short_repr
from .fsutil import fsync_dir, umask
from .models import MAX_PARAMS, Net, validate

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "train_state.safetensors"
FORMAT = "cifarlab-checkpoint-1"
CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d{9})$")
OWN_FILES = {MODEL_FILE, META_FILE, STATE_FILE}
# Size limits checked before a file is read: the largest model allowed (MAX_PARAMS fp32 values) plus
# its header; a training state holds up to four tensors per parameter (optimizer moments, lookahead).
MAX_WEIGHTS_BYTES = 4 * MAX_PARAMS + (64 << 20)
MAX_STATE_BYTES = 8 * MAX_WEIGHTS_BYTES  # optimizer (2x for Adam) + lookahead + EMA + best weights


@dataclass
class Checkpoint:
    model: Net
    meta: dict
    path: Path
    train_state: dict | None = None
    optimizer_tensors: dict = field(default_factory=dict)


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum over names, dtypes, shapes and bytes, independent of file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def versions() -> dict:
    from .version import __version__

    return {"cifarlab": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)  # unwrap DDP / compiled models
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder: str | Path, model: torch.nn.Module, meta: dict,
                    train_state: dict | None = None, optimizer_tensors: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (replacing an existing one of the same name)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = _state_tensors(model)
    meta = dict(meta, format=FORMAT, weights_sha256=weights_sha256(tensors), versions=versions())
    meta[V.META_SHA_KEY] = V.meta_sha256(meta)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp is owner-only; a checkpoint is an ordinary folder
        _write_file(tmp / MODEL_FILE, st_save_bytes(tensors, metadata={"cifarlab": json.dumps(meta)}))
        _write_file(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        if train_state is not None:
            opt = {k: v.detach().cpu().contiguous() for k, v in (optimizer_tensors or {}).items()}
            opt_meta = {"cifarlab_train_state": json.dumps(train_state),
                        "optimizer_sha256": weights_sha256(opt), V.STATE_SHA_KEY: V.state_sha256(train_state)}
            _write_file(tmp / STATE_FILE, st_save_bytes(opt, metadata=opt_meta))
        fsync_dir(tmp)
        if folder.exists():
            # Keep the old copy until the new one is in place; drop it afterwards.
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            _carry_foreign_files(folder, tmp)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{folder}: could not write the checkpoint ({e.strerror or e}); the previous "
                              f"checkpoints are untouched. Free some disk space (or fix the folder's "
                              f"permissions), then resume.") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _carry_foreign_files(old: Path, new: Path) -> None:
    """Files a user put into a checkpoint folder (an export, notes) move into its replacement: replacing
    a checkpoint (a resumed run's final/, import-keras --force) replaces cifarlab's files only.
    (Hard links, or copies where links are not possible: the old folder keeps its files until the new
    one is in place, so a crash here loses nothing.)"""
    for entry in old.iterdir():
        if entry.name in OWN_FILES or os.path.lexists(new / entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------------
# Loading


def read_safetensors_header(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict:
    """The ``__metadata__`` of a safetensors file, reading only its header (type and size checked first)."""
    V.check_regular_file(path, max_bytes, "file", CheckpointError)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(100 << 20, max_bytes):
                raise ValueError(f"header length {length}")
            header = V.parse_json(f.read(length), path, CheckpointError)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is truncated or damaged.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file (its header is not an object).")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def read_safetensors(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> tuple[dict[str, torch.Tensor], dict]:
    # A FIFO, a device (a symlink to /dev/urandom) or a huge sparse file is refused before any read.
    data = V.read_bounded(path, max_bytes, "file", CheckpointError)
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is truncated or damaged.") from None
    return tensors, header.get("__metadata__") or {}


def _parse_meta(text: str | bytes, source: str) -> dict:
    try:
        meta = V.parse_json(text, source, CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(f"{source}: not valid JSON", f"{source}: metadata is not valid JSON",
                                             1)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: not a cifarlab checkpoint: the metadata is {V._type(meta)}, not an "
                              f"object.")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a cifarlab checkpoint (format {short_repr(meta.get('format'), 60)}), "
                              f"expected {FORMAT!r}.")
    return meta


def _verified_meta(meta: dict, header_meta: dict, source: Path) -> dict:
    """The metadata's checksum (stored in it and in the weights file's header) must match, then every
    field must pass the schema (types, bounds, finite numbers)."""
    expected = meta.get(V.META_SHA_KEY)
    if "cifarlab" in header_meta and source.name == META_FILE:
        try:
            embedded = json.loads(header_meta["cifarlab"])
            expected = embedded.get(V.META_SHA_KEY) or expected
        except (ValueError, RecursionError, AttributeError):
            pass  # the header is checked when it is the metadata used
    if expected is not None:
        actual = V.meta_sha256(meta)
        if actual != expected:
            raise CheckpointError(f"{source}: metadata checksum {actual[:12]}... does not match the stored "
                                  f"{str(expected)[:12]}...; the metadata was changed after it was written "
                                  f"(damaged or edited).")
    return V.check_meta(meta, source, CheckpointError, expected_format=FORMAT)


def _check_finite(tensors: dict, source: Path) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: weights hold NaN or infinite values ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); refusing the checkpoint.")


def load_checkpoint(path: str | Path, map_location: str = "cpu", allow_pickle: bool = False,
                    with_train_state: bool = False) -> Checkpoint:
    """Load a run folder (its latest good checkpoint), a checkpoint folder, or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") and path.is_file():
        return _load_pickle_checkpoint(path, allow_pickle)
    if path.is_dir() and (path / CKPT_DIR).is_dir() or path.is_dir() and (path / "final").is_dir():
        return load_latest(path, map_location, with_train_state)
    weights = path / MODEL_FILE if path.is_dir() else path
    if path.is_dir() and (path / META_FILE).exists() and not weights.exists():
        raise CheckpointError(f"{path}: {MODEL_FILE} is missing; the checkpoint is incomplete or damaged.")
    if not weights.exists():
        raise CheckpointError(f"{path}: no checkpoint there (expected a run folder, a checkpoint folder "
                              f"with {MODEL_FILE}, or a .safetensors file).")
    tensors, header_meta = read_safetensors(weights)
    meta_path = weights.parent / META_FILE
    if weights.name == MODEL_FILE and (meta_path.exists() or meta_path.is_symlink()):
        meta = _parse_meta(V.read_bounded(meta_path, V.MAX_JSON_BYTES, "metadata", CheckpointError), str(meta_path))
        meta = _verified_meta(meta, header_meta, meta_path)
    elif "cifarlab" in header_meta:
        meta = _parse_meta(header_meta["cifarlab"], str(weights))
        meta = _verified_meta(meta, {}, weights)
    else:
        raise CheckpointError(f"{weights}: safetensors file without cifarlab metadata; cannot tell which "
                              f"architecture it holds.")
    actual = weights_sha256(tensors)
    if actual != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights}: weights checksum {actual[:12]}... does not match the metadata's "
                              f"{str(meta.get('weights_sha256'))[:12]}...; the checkpoint is damaged.")
    _check_finite(tensors, weights)
    model = _rebuild(meta, tensors, weights)
    ckpt = Checkpoint(model=model.to(map_location), meta=meta, path=weights.parent if path.is_dir() else weights)
    if with_train_state:
        ckpt.train_state, ckpt.optimizer_tensors = _load_train_state(weights.parent / STATE_FILE)
    return ckpt


def _load_train_state(state_path: Path) -> tuple[dict, dict]:
    """The training-state header and tensors, checksummed and validated field by field."""
    opt, opt_meta = read_safetensors(state_path, MAX_STATE_BYTES)
    if weights_sha256(opt) != opt_meta.get("optimizer_sha256"):
        raise CheckpointError(f"{state_path}: optimizer state checksum mismatch; the file is damaged.")
    if "cifarlab_train_state" not in opt_meta:
        raise CheckpointError(f"{state_path}: training state metadata is missing or damaged.")
    try:
        state = V.parse_json(opt_meta["cifarlab_train_state"], state_path, CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(f"training state metadata is missing or damaged: {e}") from None
    expected = opt_meta.get(V.STATE_SHA_KEY)
    if expected is not None and isinstance(state, dict) and V.state_sha256(state) != expected:
        raise CheckpointError(f"{state_path}: training state checksum mismatch; the header was changed after it "
                              f"was written (damaged or edited).")
    _check_finite({k: v for k, v in opt.items() if not k.startswith("rng.")}, state_path)
    return V.check_train_state(state, opt, state_path, CheckpointError), opt


def _rebuild(meta: dict, tensors: dict, source: Path) -> Net:
    try:
        decl = validate(meta["architecture"], num_classes=len(meta["classes"]))
    except KeyError:
        raise CheckpointError(f"{source}: metadata has no 'architecture' declaration.") from None
    except Exception as e:
        raise CheckpointError(f"{source}: stored architecture is invalid: {e}") from None
    model = Net(decl)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                                          for k in wrong[:5]) if wrong else "") if s)
        raise CheckpointError(f"{source}: weights do not fit the stored architecture {decl['name']!r}: {detail}.")
    model.load_state_dict(tensors)
    model.eval()
    return model


def _load_pickle_checkpoint(path: Path, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: PyTorch pickle checkpoints can run code when loaded, so cifarlab refuses them. "
            f"Use a .safetensors checkpoint, or pass --allow-pickle to load it with weights_only=True "
            f"(tensors only).")
    raise CheckpointError(
        f"{path}: a pickle file holds no cifarlab metadata (architecture, classes); load its tensors with "
        f"load_pickle_weights() and convert them with cifarlab's Python API.")


def load_pickle_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a ``.pt``/``.pth`` file, only when explicitly allowed and only with weights_only."""
    path = Path(path)
    if not allow_pickle:
        _load_pickle_checkpoint(path, allow_pickle=False)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any global it does not know
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict).")
    return obj


# ---------------------------------------------------------------------------------------------------
# Run folders: numbered checkpoints, newest good one wins


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, newest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_latest(run_dir: str | Path, map_location: str = "cpu", with_train_state: bool = False,
                report=print) -> Checkpoint:
    """The newest checkpoint that loads and verifies; damaged ones are reported and skipped."""
    run_dir = Path(run_dir)
    candidates = checkpoint_dirs(run_dir)
    if not with_train_state and (run_dir / "final" / MODEL_FILE).exists():
        candidates.insert(0, run_dir / "final")
    errors = []
    for folder in candidates:
        try:
            return load_checkpoint(folder, map_location, with_train_state=with_train_state)
        except CheckpointError as e:
            errors.append(str(e))
            if report:
                report(f"warning: skipping damaged checkpoint: {e}")
    if errors:
        raise CheckpointError(f"{run_dir}: no usable checkpoint; all {len(errors)} are damaged. First: {errors[0]}")
    raise CheckpointError(f"{run_dir}: no checkpoint found in {run_dir / CKPT_DIR}.")


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` checkpoints; also sweep temporary folders a crash left behind."""
    for old in checkpoint_dirs(run_dir)[keep:]:
        # Rename first: a kill during the deletion leaves a hidden folder that the sweep below removes,
        # never a half-deleted checkpoint that still looks complete.
        doomed = old.with_name(f".{old.name}.deleting")
        try:
            os.rename(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for tmp in root.glob(".step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}"


def check_input_shape(ckpt: Checkpoint, image_shape, what: str = "the data") -> None:
    """The checkpoint's model can take images of ``image_shape`` (C, H, W) with its weights, else a one-line
    CheckpointError naming the layer and what to pass (before any image goes in: a flattening net fed
    another size fails deep inside torch). A net that ends in a global pool takes other sizes its layers
    allow; one that flattens takes its own size only."""
    from .errors import DeclarationError
    from .models import input_shape, layers

    declaration = ckpt.model.declaration
    trained, shape = tuple(input_shape(declaration)), tuple(int(v) for v in image_shape)
    if shape == trained:
        return
    try:
        pairs = zip(layers(declaration), layers(validate(declaration, input_shape=shape)))
        problem = next((f"its layer {a.name!r} has weights for {_shape_text(a.input_shape)} inputs, not "
                        f"{_shape_text(b.input_shape)}" for a, b in pairs if a.params != b.params), None)
    except DeclarationError as e:
        problem = str(e)
    if problem:
        raise CheckpointError(f"{ckpt.path}: the model takes {_shape_text(trained)} images and {what} is "
                              f"{_shape_text(shape)} ({problem}). Use pictures of the model's size: leave out "
                              f"--image-size (the run's own data comes back at its size), or pass --image-size "
                              f"{trained[1]} with a folder dataset.")


def _shape_text(shape) -> str:
    return "x".join(str(v) for v in shape)
