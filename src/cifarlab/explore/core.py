"""The explorer's work, without the web: one run loaded once, and the answers the page asks for.

:class:`Explorer` holds a run's checkpoint, its data (for test images, nearest training images and
dataset examples) and its OOD detector, and answers three questions as JSON-ready dicts:

* :meth:`Explorer.explain_file` / :meth:`Explorer.explain_test`: one picture (an uploaded file, read by
  the same safe reader as ``predict``, or a test image by index) as the net sees it, its calibrated top
  classes, the "unlike any class I know" verdict, attribution maps, every layer's activation maps and the
  nearest training images (:func:`cifarlab.explain.photo.explain_photos`, the one path ``predict
  --explain`` uses too).
* :meth:`Explorer.channel`: one channel (or class) of one layer: its maximum stimulus, made on demand the
  way ``cifarlab visualize`` makes it (the run's ``visualize/summary.json`` settings when there are any;
  each channel's stimulus is its own, so one channel alone gives the same image as the full run), and
  the training images that excite it most: one pass over the first ``example_images`` training images
  for every layer at once, started in the background (on a copy of the model) after the first picture,
  since a channel click usually follows, and kept.

One lock guards the model: forward hooks are registered on the shared module, so two requests running
through it at once would read each other's activations. Decoding a file needs no lock.

The attribution maps are :func:`cifarlab.explain.attribute`'s, with the baseline rule of
:func:`~cifarlab.explain.photo.explain_photos` (the training images' mean colour when the feature bank is
loaded, else the normalization's mean), but that mean colour is computed once here: ``explain_photos``
recomputes it over all training images for each method of each call (about 2 s per method for 50,000
images on 2 busy cores), so the explorer asks it for the verdict and neighbours only (``methods=()``) and
makes the maps itself. ``tests/test_explore.py`` checks both give the same maps.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import CifarlabError
from ..explain.photo import baseline_reference

TOP_K = 5               # calibrated classes shown
NEIGHBOURS = 5          # nearest training images shown
EXAMPLES = 9            # training images per channel, as visualize's dataset examples
EXAMPLE_IMAGES = 10_000 # training images searched for them: one pass, ~10 s on 2 busy cores for the fast net
MAX_NAME_CHARS = 200    # an uploaded file's name as the page shows it
DEFAULT_SOURCE = "cifarlab visualize's default settings"


class ExploreError(CifarlabError):
    """A question the explorer cannot answer (an index out of range, an unknown layer or channel)."""


@dataclass(frozen=True)
class ExploreSettings:
    top_k: int = TOP_K
    methods: tuple = ("integrated_gradients", "grad_cam")   # explain.PHOTO_METHODS, predict --explain's
    neighbours: int = NEIGHBOURS
    examples: int = EXAMPLES
    example_images: int | None = EXAMPLE_IMAGES  # the first N training images searched for examples (None: all)
    ood: bool = True                    # load (or build once) the run's feature bank


def display_name(name) -> str:
    """An uploaded file's name as one printable line of at most MAX_NAME_CHARS characters; the page
    inserts it as text, never as markup."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(name or "upload"))
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS - 1] + "\u2026"


class Explorer:
    """A run, loaded once; see the module docstring. Build with :meth:`open`."""

    def __init__(self, ckpt, run_dir: Path | None, data=None, train=None, detector=None,
                 settings: ExploreSettings | None = None, notes: list[str] | None = None):
        from ..images import fit_of
        from ..models import input_shape
        from ..net_layers import stimulus_targets
        from ..temperature import checkpoint_temperature
        from ..transforms import Normalization

        self.ckpt, self.run_dir, self.data, self.train, self.detector = ckpt, run_dir, data, train, detector
        self.settings = settings or ExploreSettings()
        self.notes = list(notes or [])
        self.model = ckpt.model.cpu().eval()
        self.classes = list(ckpt.meta["classes"])
        self.normalization = Normalization.from_dict(ckpt.meta["normalization"])
        self.temperature = checkpoint_temperature(ckpt.meta)
        self.size = int(input_shape(ckpt.meta["architecture"])[-1])
        self.fit = fit_of(ckpt.meta.get("dataset"))
        self.targets = {t.name: t for t in stimulus_targets(self.model)}
        self.stimulus_settings, self.stimulus_seed, self.stimulus_source = _stimulus_settings(run_dir, self.notes)
        self.reference = baseline_reference(detector, self.normalization)  # the same baseline as predict --explain
        self.lock = threading.Lock()
        self._stimuli: dict[tuple[str, int], torch.Tensor] = {}
        self._examples: Future | None = None
        self._examples_lock = threading.Lock()
        self._examples_thread: threading.Thread | None = None
        self._closing = threading.Event()

    @classmethod
    def open(cls, run, data_dir=None, settings: ExploreSettings | None = None, log=print) -> "Explorer":
        """Load the run (a run folder or any checkpoint ``predict`` takes), its data and its OOD detector.
        Missing data or a missing feature bank are notes, not failures: the explorer then answers without
        test images, examples, neighbours or the verdict, and says so."""
        from .. import ood
        from ..checkpoints import load_checkpoint
        from ..data import load_stored

        settings = settings or ExploreSettings()
        ckpt = load_checkpoint(run)
        run_dir = ood.run_dir_of(run) or ood.run_dir_of(ckpt.path)
        notes, data, train, detector = [], None, None, None
        entry = ckpt.meta.get("dataset")
        try:
            if not isinstance(entry, dict):
                raise ExploreError("the checkpoint does not record which data it was trained on")
            data = load_stored(entry, data_dir=data_dir, log=log)
        except (CifarlabError, OSError) as e:
            notes.append(f"the run's data is unavailable ({e}): no test images, dataset examples or nearest "
                         f"training images")
        if data is not None:
            try:
                train = ood.training_images(ckpt, data)
            except CifarlabError as e:
                notes.append(f"the run's training images cannot be rebuilt ({e}): no dataset examples or nearest "
                             f"training images")
        if train is not None and settings.ood:
            try:
                if run_dir is None:
                    raise ExploreError("the checkpoint is not inside a run folder")
                detector = ood.prepare(ckpt, data, run_dir=run_dir, log=log)
            except (CifarlabError, OSError) as e:
                notes.append(f"the out-of-distribution verdict and nearest training images are unavailable: {e}")
        return cls(ckpt, run_dir, data, train, detector, settings, notes)

    # -----------------------------------------------------------------------------------------------
    # What the page shows first

    def info(self) -> dict:
        """The run as the page introduces it (no pictures)."""
        meta = self.ckpt.meta
        return {"run": str(self.run_dir or self.ckpt.path), "architecture": meta["architecture"].get("name"),
                "dataset": (meta.get("dataset") or {}).get("spec"), "classes": self.classes,
                "image_size": self.size, "fit": self.fit, "temperature": self.temperature,
                "test_images": len(self.data.test) if self.data is not None else 0,
                "training_images": len(self.train) if self.train is not None else 0,
                "ood": self.detector is not None, "methods": list(self.settings.methods),
                "layers": [{"name": t.name, "channels": t.channels, "kind": t.kind} for t in self.targets.values()],
                "notes": list(self.notes)}

    # -----------------------------------------------------------------------------------------------
    # One picture

    def read_upload(self, path: Path, name: str) -> torch.Tensor:
        """An uploaded file (already on disk, size-capped) read the run's way by the safe image reader;
        its errors name the upload, not the private temporary file."""
        from ..errors import ImageError
        from ..images import load_image

        try:
            return load_image(path, self.size, fit=self.fit)
        except ImageError as e:
            raise ImageError(str(e).replace(str(path), name)) from None

    def explain_file(self, path: Path, name: str) -> dict:
        name = display_name(name)
        return self.explain_image(self.read_upload(path, name), name, {"kind": "upload"})

    def explain_test(self, index) -> dict:
        if self.data is None:
            raise ExploreError("no test images: the run's data could not be loaded (see the notes)")
        n = len(self.data.test)
        i = _index(index, n, "test image index")
        true = self.classes[int(self.data.test.labels[i])]
        return self.explain_image(self.data.test.images[i], f"test image #{i}",
                                  {"kind": "test", "index": i, "true_class": true})

    def explain_image(self, image: torch.Tensor, name: str, extra: dict | None = None) -> dict:
        """Everything the page shows about one uint8 (C, S, S) picture already read the run's way."""
        from ..explain.photo import METHOD_TITLES, explain_photos
        from ..predict import predict_images
        from ..visualize import activation_maps
        from .render import activation_layer, image_uri, overlay_uri

        started = time.perf_counter()
        s = self.settings
        batch = image[None]
        with self.lock:
            predictions = predict_images(self.ckpt, batch, s.top_k)
            e = explain_photos(self.ckpt, batch, [name], predictions, self.detector, (), s.neighbours)[0]
            e.maps, e.layer = self._attributions(batch, self.classes.index(e.label))
            maps = activation_maps(self.model, image, self.normalization)
        self._start_examples()
        top = [dict(p, index=self.classes.index(p["class"])) for p in e.predictions]
        neighbours = [dict(n, image=image_uri(e.neighbour_images[j])) for j, n in enumerate(e.neighbours)]
        return dict(extra or {}, name=name, image=image_uri(e.image), size=self.size, predictions=top,
                    temperature=self.temperature, ood=e.ood, verdict=e.verdict(), flagged=bool(e.ood and e.ood["flag"]),
                    maps=[{"method": m, "title": " ".join(METHOD_TITLES.get(m, m).split()),
                           "image": overlay_uri(e.image, v)} for m, v in e.maps.items()],
                    gradcam_layer=e.layer, layers=[activation_layer(k, v) for k, v in maps.items()],
                    neighbours=neighbours, agree=e.agree if e.neighbours else None,
                    notes=e.notes, seconds=round(time.perf_counter() - started, 3))

    def _attributions(self, batch: torch.Tensor, target: int) -> tuple[dict, str | None]:
        """Each method's map of ``target`` for a batch of one (as explain_photos makes them; module docstring)."""
        from ..explain import attribute

        maps, layer = {}, None
        for method in self.settings.methods:
            a = attribute(method, self.model, batch, self.normalization, target=torch.tensor([target]),
                          reference=self.reference)
            maps[method], layer = a.maps[0], a.layer or layer
        return maps, layer

    # -----------------------------------------------------------------------------------------------
    # One channel

    def channel(self, layer: str, channel) -> dict:
        """A channel of a stimulus target (or a class of "classes"): its maximum stimulus and the
        training images that excite it most, with each one's activation (the channel's mean over space,
        or the class logit: the stimulus's own objective)."""
        from ..explain.examples import activations
        from .render import image_uri

        target = self.targets.get(str(layer))
        if target is None:
            raise ExploreError(f"no layer {display_name(layer)!r} to explore; the layers are "
                               f"{', '.join(self.targets)}")
        c = _index(channel, target.channels, f"{target.name}'s channel" if target.spatial else "class")
        with self.lock:
            stimulus = self._stimulus(target, c)
            own = float(activations(self.model, stimulus[None], self.normalization, target.name)[0, c])
        answer = {"layer": target.name, "channel": c, "class": None if target.spatial else self.classes[c],
                  "stimulus": image_uri(stimulus), "stimulus_activation": own,
                  "stimulus_method": self.stimulus_settings.method, "stimulus_seed": self.stimulus_seed,
                  "stimulus_source": self.stimulus_source, "examples": [], "examples_from": None, "ratio": None}
        examples = self._start_examples()
        if examples is not None:
            top = examples.result()[target.name]  # waits for the background pass when it is still running
            indices, values = top.indices[c], top.values[c]
            answer["examples"] = [{"index": int(i), "class": self.classes[int(self.train.labels[i])],
                                   "activation": float(v), "image": image_uri(self.train.images[i])}
                                  for i, v in zip(indices.tolist(), values.tolist())]
            answer["examples_from"] = self._example_count()
            best = float(values[0]) if len(values) else math.nan
            answer["ratio"] = own / best if best > 0 else None
        return answer

    def _stimulus(self, target, c: int) -> torch.Tensor:
        from ..visualize import maximum_stimuli

        key = (target.name, c)
        if key not in self._stimuli:
            found = maximum_stimuli(self.model, target, self.normalization, self.stimulus_settings,
                                    self.stimulus_seed, channels=[c])
            self._stimuli[key] = found.images[0]
        return self._stimuli[key]

    def _example_count(self) -> int:
        n = len(self.train)
        return n if self.settings.example_images is None else min(n, self.settings.example_images)

    def _start_examples(self) -> Future | None:
        """The background pass that finds every channel's top training images (all layers at once, on a copy
        of the model so requests go on meanwhile); started once, None without training images."""
        from ..explain.examples import top_activating

        if self.train is None:
            return None
        with self._examples_lock:
            if self._examples is None and not self._closing.is_set():
                with self.lock:
                    model = copy.deepcopy(self.model)
                model.register_forward_pre_hook(self._stop_when_closing)
                images = self.train.images[:self._example_count()]
                job = self._examples = Future()

                def work():
                    try:
                        job.set_result(top_activating(model, images, self.normalization, layers=tuple(self.targets),
                                                      k=self.settings.examples))
                    except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
                        job.set_exception(e)
                self._examples_thread = threading.Thread(target=work, name="cifarlab-explore-examples", daemon=True)
                self._examples_thread.start()
        if self._examples is None:
            raise ExploreError("the explorer is shutting down")
        return self._examples

    def _stop_when_closing(self, module, args):
        """The background pass's model checks this before each batch: close() ends the pass within a batch."""
        if self._closing.is_set():
            raise ExploreError("the explorer is shutting down")

    def close(self, timeout: float = 60.0) -> None:
        """Stop the background pass and wait for it. A daemon thread still inside torch when the interpreter
        exits aborts the process ("terminate called without an active exception"), so the server calls this
        when it stops (the app's lifespan)."""
        self._closing.set()
        if self._examples_thread is not None:
            self._examples_thread.join(timeout)


def _index(value, n: int, what: str) -> int:
    """``value`` (an int, or the text of one) as an index in 0..n-1, or an error that says the range."""
    text = str(value).strip()
    if not (text.isdecimal() and text.isascii() and len(text) <= 12) or int(text) >= n:
        shown = text if len(text) <= 20 else text[:19] + "\u2026"
        raise ExploreError(f"{what} must be a whole number from 0 to {n - 1}, not {display_name(shown)!r}")
    return int(text)


def _stimulus_settings(run_dir: Path | None, notes: list[str]):
    """(settings, seed, where they came from): those of the run's ``visualize/summary.json`` when it is
    there and reads back (every field typed as the default's, the bounds checked), else visualize's
    defaults; an unusable summary is a note."""
    from ..errors import VisualizationError
    from ..validation import ValidationError, load_json_file
    from ..visualize import StimulusSettings

    default = StimulusSettings()
    path = run_dir / "visualize" / "summary.json" if run_dir is not None else None
    if path is None or not path.exists():
        return default, 0, DEFAULT_SOURCE
    try:
        summary = load_json_file(path, "visualize summary")
        stored, seed = summary.get("settings"), summary.get("seed")
        if not isinstance(stored, dict) or type(seed) is not int or not 0 <= seed < 2 ** 63:
            raise ValidationError(f"{path}: no settings/seed entry")
        changes = {}
        for f in fields(StimulusSettings):
            value = stored.get(f.name, getattr(default, f.name))
            expected = type(getattr(default, f.name))
            if expected is float and type(value) is int:
                value = float(value)
            if type(value) is not expected or (expected is float and not math.isfinite(value)):
                raise ValidationError(f"{path}: settings.{f.name} is not a {expected.__name__}")
            changes[f.name] = value
        return replace(default, **changes).validate(), seed, f"the settings of {path}"
    except (ValidationError, VisualizationError) as e:
        notes.append(f"stimuli use visualize's defaults: {e}")
        return default, 0, DEFAULT_SOURCE
