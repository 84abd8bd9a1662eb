"""The image-folder path against the binary reader, on all of CIFAR-10.

Writes the 60,000 CIFAR-10 images as PNG files (lossless) in the ImageFolder layout (once; reused), then
measures: seconds to decode them the first time (a fresh cache) and to load the decoded cache the second
time; that the folder holds exactly the binary reader's (image, label) pairs; and the test accuracy of the
same recipe (default `fast`, seed 0) trained on the folder and on the binary files, side by side.

    python bench/bench_folder.py --data-dir ../shared/cifar-10-batches-bin --png-dir /tmp/cifar10-png
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, table  # noqa: E402

from cifarlab.data import load_cifar10, load_dataset  # noqa: E402
from cifarlab.evaluate import evaluate_model  # noqa: E402
from cifarlab.train import recipe_from, train  # noqa: E402


def write_pngs(data, root: Path) -> float:
    from PIL import Image

    start = time.perf_counter()
    for split, part in (("train", data.train), ("test", data.test)):
        for c in data.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        pixels = part.images.permute(0, 2, 3, 1).numpy()
        for i, (img, label) in enumerate(zip(pixels, part.labels.tolist())):
            Image.fromarray(img).save(root / split / data.classes[label] / f"{i:05d}.png")
    (root / ".complete").write_text("ok")
    return time.perf_counter() - start


def fingerprint(split) -> list[str]:
    return sorted(hashlib.sha256(x.numpy().tobytes() + bytes([int(y)])).hexdigest()
                  for x, y in zip(split.images, split.labels))


def accuracy(recipe, data, run_dir: Path) -> tuple[float, float]:
    result = train(recipe, data, run_dir, progress=False, log=lambda *a, **k: None)
    ev = evaluate_model(result.model, data.test.images, data.test.labels, data.classes, result.normalization,
                        tta=recipe.tta)
    return ev.accuracy, result.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--png-dir", default=str(Path(tempfile.gettempdir()) / "cifar10-png"))
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args()
    header("Image folder vs binary reader, CIFAR-10", "decode / cache seconds, identity of the images, accuracy "
           f"of the {args.preset} preset on each (bf16 autocast where native, evaluation fp32)")
    binary = load_cifar10(args.data_dir, download=False)
    root = Path(args.png_dir)
    if not (root / ".complete").exists():
        print(f"writing 60,000 PNGs into {root}: {write_pngs(binary, root):.1f} s")
    os.environ["CIFARLAB_CACHE"] = tempfile.mkdtemp(prefix="cifarlab-cache-")
    start = time.perf_counter()
    folder = load_dataset(f"folder:{root}", log=print)
    first = time.perf_counter() - start
    start = time.perf_counter()
    load_dataset(f"folder:{root}")
    second = time.perf_counter() - start
    same = fingerprint(folder.train) == fingerprint(binary.train) and fingerprint(folder.test) == fingerprint(
        binary.test)
    print(table([{"what": "decode 60,000 PNGs (first run, empty cache)", "seconds": first},
                 {"what": "load the decoded cache (second run)", "seconds": second}], ["what", "seconds"]))
    print(f"\nsame (image, label) pairs as the binary reader, train and test: {same}; classes "
          f"{'equal' if folder.classes == binary.classes else 'differ'}\n")
    if args.no_train:
        return
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for seed in args.seeds:
            recipe = recipe_from(args.preset, seed=seed)
            for name, data in (("binary files", binary), ("PNG folder", folder)):
                acc, seconds = accuracy(recipe, data, Path(runs) / f"{name.split()[0]}-{seed}")
                rows.append({"data": name, "seed": seed, "test accuracy %": 100 * acc, "train s": seconds})
    print(table(rows, ["data", "seed", "test accuracy %", "train s"]))


if __name__ == "__main__":
    main()
