"""``cifarlab export CHECKPOINT --format onnx``: a self-contained ONNX model, normalization included.

The ONNX model's contract (also stored in the file's metadata and doc string):

* input ``pixels``: float32, shape (N, C, H, W) of the checkpoint's images (3x32x32 for CIFAR), N dynamic; RGB, channels first (NCHW), raw 0..255
  values exactly as in the image (not divided by 255, not normalized; the checkpoint's normalization is
  the first operation of the graph);
* output ``logits``: float32 (N, num_classes);
* output ``probabilities``: float32 (N, num_classes), ``softmax(logits / T)`` with the checkpoint's
  temperature T (fitted on held-out training images; 1 when the checkpoint has none);
* metadata ``cifarlab.classes`` (JSON list, index = class id), ``cifarlab.normalization``,
  ``cifarlab.architecture``, ``cifarlab.temperature`` (T, and ``cifarlab.calibration``: where it was fitted),
  ``cifarlab.fit`` (how the training pictures were made square: ``crop``, ``squish`` or ``pad``).

Images of another size must first be brought to that size as ``cifarlab.images.load_image`` does, with the
fit in ``cifarlab.fit`` (``load_image(path, size, fit=...)``: crop = the centered square, squish = the
whole picture stretched, pad = aspect kept and the margins reflected; then Lanczos). The graph
is the plain model in eval mode (dropout off, batchnorm running statistics); flip test-time augmentation
is not part of it. The file is verified with onnxruntime (when installed) before it is written,
atomically.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoints as ckpts
from .checkpoints import Checkpoint, load_checkpoint
from .errors import CifarlabError
from .evaluate import predict_logits
from .fsutil import atomic_create_bytes, atomic_write_bytes
from .images import fit_of
from .rundir import LOCK_FILE
from .temperature import checkpoint_temperature
from .transforms import Normalization

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
DEFAULT_OPSET = 17
VERIFY_TOLERANCE = 1e-3  # max |logit difference| on random pixels accepted at export time


class PixelsModel(nn.Module):
    """``model(normalization(pixels))`` and its softmax at ``temperature``.

    Calls the checkpoint's :class:`Normalization` itself, so the traced graph holds exactly PyTorch's
    normalization arithmetic (its per-channel constants become graph constants).
    """

    def __init__(self, model: nn.Module, normalization: Normalization, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.normalization = normalization
        self.temperature = float(temperature)

    def forward(self, pixels: torch.Tensor):
        logits = self.model(self.normalization(pixels))
        if self.temperature == 1.0:
            return logits, torch.softmax(logits, dim=1)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise CifarlabError("ONNX export needs the 'onnx' package: pip install 'cifarlab[onnx]'") from None
    return onnx


def input_shape(ckpt: Checkpoint) -> tuple[int, int, int]:
    """(C, H, W) the checkpoint's model takes."""
    from .models import input_shape as declared

    return declared(ckpt.meta["architecture"])


def onnx_bytes(ckpt: Checkpoint, opset: int = DEFAULT_OPSET) -> bytes:
    """The checkpoint's model as a serialized ONNX model (see the module docstring for its contract)."""
    onnx = _require_onnx()
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    wrapped = PixelsModel(ckpt.model.float().cpu().eval(), normalization,
                          checkpoint_temperature(ckpt.meta) or 1.0).eval()
    example = torch.full((1, *input_shape(ckpt)), 127.0)
    buffer = io.BytesIO()
    batch = {0: "batch"}
    kwargs = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset,
                  dynamic_axes={INPUT_NAME: batch, OUTPUT_NAMES[0]: batch, OUTPUT_NAMES[1]: batch})
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no extra packages (the dynamo-based
        # one needs onnxscript) and handles every layer cifarlab declares.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapped, (example,), buffer, dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no 'dynamo' argument (and only this exporter)
            buffer = io.BytesIO()
            torch.onnx.export(wrapped, (example,), buffer, **kwargs)
    proto = onnx.load_from_string(buffer.getvalue())
    _describe(proto, ckpt, normalization)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _describe(proto, ckpt: Checkpoint, normalization: Normalization) -> None:
    from .version import __version__

    arch = ckpt.meta["architecture"].get("name", "custom")
    shape = ", ".join(map(str, input_shape(ckpt)))
    fit = fit_of(ckpt.meta.get("dataset"))
    proto.producer_name, proto.producer_version = "cifarlab", __version__
    proto.graph.name = arch
    proto.doc_string = (f"cifarlab {arch}: input '{INPUT_NAME}' float32 (N, {shape}) RGB NCHW raw 0..255 "
                        f"pixels (normalization is inside); outputs 'logits' and 'probabilities' (N, "
                        f"{len(ckpt.meta['classes'])}), probabilities = softmax(logits / T) with T in metadata "
                        f"'cifarlab.temperature'; classes in metadata 'cifarlab.classes'. Pictures of another "
                        f"shape: made square by '{fit}' (metadata 'cifarlab.fit'), then Lanczos-resized.")
    meta = {"cifarlab.classes": json.dumps(list(ckpt.meta["classes"])),
            "cifarlab.normalization": json.dumps(normalization.to_dict()),
            "cifarlab.architecture": arch,
            "cifarlab.input": f"{INPUT_NAME}: float32 (N, {shape}), RGB, 0..255",
            "cifarlab.fit": fit,
            "cifarlab.weights_sha256": str(ckpt.meta.get("weights_sha256", "")),
            "cifarlab.temperature": repr(checkpoint_temperature(ckpt.meta) or 1.0),
            "cifarlab.calibration": json.dumps(ckpt.meta.get("calibration")
                                               or {"temperature": None, "note": "probabilities: plain softmax"})}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def run_onnx(model: bytes | str | Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) from onnxruntime for float32 pixels (N, 3, 32, 32) in 0..255."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CifarlabError("running an ONNX model needs 'onnxruntime': pip install 'cifarlab[onnx]'") from None
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})
    return logits, probabilities


def compare_with_torch(model: bytes | str | Path, ckpt: Checkpoint, images: torch.Tensor) -> dict:
    """Run uint8 images (N, C, H, W) through ONNX and PyTorch; max |logit diff| and prediction agreement."""
    normalization = Normalization.from_dict(ckpt.meta["normalization"])
    expected = predict_logits(ckpt.model, images, normalization).numpy()
    logits, _ = run_onnx(model, images.numpy().astype(np.float32))
    return {"images": len(images), "max_abs_logit_diff": float(np.abs(logits - expected).max()),
            "same_predictions": bool((logits.argmax(1) == expected.argmax(1)).all())}


# What a run folder holds besides your exports: its checkpoint folders and the files cifarlab writes there.
# An export at one of these names, even before the run has written it, would break the run's next write
# (a file named final/ makes the resumed run fail to save its final model).
CHECKPOINT_ENTRIES = {"final", ckpts.CKPT_DIR}
RUN_FILES = {"eval", "visualize", "tensorboard", "ood", "recipe.json", "dataset.json", "model.json", "metrics.csv",
             "training_curves.png", "report.html", LOCK_FILE}


def _is_checkpoint_folder(folder: Path) -> bool:
    return (folder / ckpts.MODEL_FILE).exists() or (folder / ckpts.META_FILE).exists() \
        or bool(ckpts.CKPT_RE.match(folder.name)) and folder.parent.name == ckpts.CKPT_DIR


def _is_run_folder(folder: Path) -> bool:
    return any(os.path.lexists(folder / name) for name in (LOCK_FILE, "recipe.json", ckpts.CKPT_DIR)) \
        or (folder / "final" / ckpts.META_FILE).exists()


def _refuse_checkpoint_folders(out: Path, path: Path) -> None:
    for folder in path.parents:
        if _is_checkpoint_folder(folder):
            raise CifarlabError(f"{out}: inside the checkpoint folder {folder}; exports never go into a checkpoint "
                                f"(a resumed run replaces it). Choose --out elsewhere, e.g. the run folder.")


def _refuse_run_entries(out: Path, path: Path) -> None:
    for folder in path.parents:
        entry = path.relative_to(folder).parts[0]
        if (entry in CHECKPOINT_ENTRIES or entry in RUN_FILES) and _is_run_folder(folder):
            what = "checkpoints" if entry in CHECKPOINT_ENTRIES else "files"
            raise CifarlabError(f"{out}: {folder / entry} is where the run {folder} keeps its own {what}; an export "
                                f"there would break the run. Choose another --out, e.g. {folder / 'model.onnx'}.")


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """An export never goes into a checkpoint folder or at a name a run folder reserves (``final``,
    ``checkpoints``, ``metrics.csv``...: the run's next write would fail or replace it), and never replaces an
    existing file unless ``overwrite`` (and never a folder or link). Missing folders are fine: they are
    created when the file is written. Both the path as given and with its links resolved are checked."""
    out = Path(out)
    absolute = Path(os.path.abspath(out))
    paths = (absolute, Path(os.path.realpath(absolute.parent)) / absolute.name)
    for path in paths:
        _refuse_checkpoint_folders(out, path)
    if os.path.lexists(out):
        if not overwrite or out.is_symlink() or not out.is_file():
            raise CifarlabError(f"{out} already exists; not replacing it. Choose another --out"
                                + (" (or pass --force to replace a file)." if not overwrite else "."))
        if out.name in ckpts.OWN_FILES:
            raise CifarlabError(f"{out}: a checkpoint's own file name; never replaced by an export.")
    for path in paths:
        _refuse_run_entries(out, path)
    for folder in (absolute.parent, *absolute.parent.parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise CifarlabError(f"{out}: {folder} is not a folder; choose another --out.")
            break
    return out


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, innermost first (to undo)."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            pass  # made at this moment by someone else
        except OSError as e:
            raise CifarlabError(f"{p}: cannot create the folder ({e.strerror or e}).") from None
    return missing


def export_onnx(ckpt: Checkpoint, out: str | Path, opset: int = DEFAULT_OPSET, verify: bool = True,
                overwrite: bool = False) -> dict:
    """Write the ONNX model atomically; with ``verify``, first check it against PyTorch in onnxruntime.
    Refuses an output inside a checkpoint folder, and an existing file unless ``overwrite``."""
    out = check_output(out, overwrite)
    data = onnx_bytes(ckpt, opset)
    report = {"path": str(out), "bytes": len(data), "opset": opset}
    if verify and _has_onnxruntime():
        # Random pixels exercise every input value range; 16 images take milliseconds.
        images = torch.randint(0, 256, (16, *input_shape(ckpt)), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8)
        check = compare_with_torch(data, ckpt, images)
        if not check["max_abs_logit_diff"] <= VERIFY_TOLERANCE:
            raise CifarlabError(f"the exported ONNX model disagrees with PyTorch (max |logit diff| "
                                f"{check['max_abs_logit_diff']:.3g} > {VERIFY_TOLERANCE}); not writing {out}.")
        report["verified"] = check
    check_output(out, overwrite)  # again: the export took a while
    created = _make_folders(Path(os.path.abspath(out)).parent)
    try:
        if overwrite:
            atomic_write_bytes(out, data)
        else:
            try:
                atomic_create_bytes(out, data)
            except FileExistsError:
                raise CifarlabError(f"{out} appeared while exporting; not replacing it.") from None
    except BaseException:
        for folder in created:  # a failed export leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return report


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_output(checkpoint: str | Path) -> Path:
    """Beside a .safetensors file (same name, .onnx); ``model.onnx`` in a run folder; for a checkpoint
    folder, beside it (``final`` -> the run's ``model.onnx``, ``step-N`` -> ``step-N.onnx``), never inside."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        if path.name == ckpts.MODEL_FILE and (path.parent / ckpts.META_FILE).exists():
            return default_output(path.parent)
        return path.with_suffix(".onnx")
    if (path / ckpts.MODEL_FILE).exists():
        if path.name == "final":
            return path.parent / "model.onnx"
        beside = path.parent.parent if path.parent.name == ckpts.CKPT_DIR else path.parent
        return beside / f"{path.name}.onnx"
    return path / "model.onnx"


def output_path(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Where ``--out`` means to write: nothing given, the :func:`default_output`; a folder (one that exists, or
    a path written with a trailing '/'), the default file name inside it; else the file itself."""
    if not out:
        return default_output(checkpoint)
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / default_output(checkpoint).name
    return Path(out)
