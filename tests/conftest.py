"""Shared fixtures: the real CIFAR-10 data (from ../shared or $CIFARLAB_DATA) and a small trained run."""
from __future__ import annotations

import http.server
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifarlab" / "cifar-10-batches-bin"
    # $CIFARLAB_DATA (CI), the shared copy beside the repository (development), or what `make run` downloaded.
    candidates = [os.environ.get("CIFARLAB_DATA"), REPO.parent / "shared" / "cifar-10-batches-bin", cache]
    for c in candidates:
        if c and (Path(c) / "data_batch_1.bin").is_file():
            return Path(c)
    return None


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's ~/.cache/cifarlab; verification stamps are shared per session."""
    cache = tmp_path_factory.getbasetemp() / "cifarlab-cache"
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def one_thread():
    """One intra-op thread, like the driver processes those tests start: the 2 shared cores are not
    oversubscribed (OpenMP threads spinning against each other make every step erratic)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = real_data_dir()
    if found is None:
        pytest.fail("the real CIFAR-10 binary data is needed: set CIFARLAB_DATA to a cifar-10-batches-bin folder "
                    "(CI uses ../shared/cifar-10-batches-bin)")
    return found


@pytest.fixture(scope="session")
def cifar(data_dir, tmp_path_factory):
    """The real dataset, loaded once per test session."""
    os.environ["CIFARLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "cifarlab-cache")
    from cifarlab.data import load_cifar10

    return load_cifar10(data_dir, download=False)


@pytest.fixture(scope="session")
def trained_run(cifar, tmp_path_factory):
    """The exercise net trained for 1 short epoch (3,000 images) on real data: a real, small checkpoint.

    Returns the run folder (with checkpoints/ and final/). About 5 s on 2 cores.
    """
    import torch

    from cifarlab.data import CIFAR10
    from cifarlab.train import recipe_from, train

    torch.manual_seed(0)
    small = CIFAR10(train=cifar.train.subset(slice(0, 3000)), test=cifar.test.subset(slice(0, 1000)),
                    classes=cifar.classes, root=cifar.root)
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(recipe_from("exercise", epochs=1), small, run_dir, progress=False, log=lambda *a, **k: None)
    return run_dir


def write_image_folder(data, root: Path, test_images: int | None = None) -> Path:
    """``data`` (a cifarlab Dataset) as PNG files in the ImageFolder layout: root/train/<class>/NNNNN.png and
    root/test/<class>/NNNNN.png. PNG is lossless, so the folder dataset loads exactly these pixels back."""
    from PIL import Image

    splits = {"train": data.train, "test": data.test if test_images is None else data.test.subset(slice(0, test_images))}
    for split, part in splits.items():
        for c in data.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        pixels = part.images.permute(0, 2, 3, 1).numpy()
        for i, (img, label) in enumerate(zip(pixels, part.labels.tolist())):
            Image.fromarray(img).save(root / split / data.classes[label] / f"{i:05d}.png", compress_level=1)
    return root


@contextmanager
def serve(body: bytes, declared_length: int | None = None, name: str = "cifar-10-binary.tar.gz"):
    """Serve ``body`` at http://127.0.0.1:PORT/<name> (real HTTP on loopback); optionally lie about its length."""

    class Handler(http.server.BaseHTTPRequestHandler):
        requests = 0

        def do_GET(self):  # noqa: N802
            Handler.requests += 1
            self.send_response(200)
            self.send_header("Content-Length", str(declared_length if declared_length is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{name}", Handler
    finally:
        server.shutdown()
        server.server_close()
