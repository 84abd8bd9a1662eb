"""CIFAR-10 at odd sizes, as a photo folder: the data to choose the default ``--fit`` on.

Writes the first N training images and the first M test images of CIFAR-10 (binary version) in the
ImageFolder layout, ``OUT/train/<class>/NNNNN.png`` and ``OUT/test/<class>/NNNNN.png``, each resized
(Pillow Lanczos, so upscaled: CIFAR's images are 32x32) to a random non-square size: width and height
drawn independently and uniformly from MIN..MAX px (default 32..160; a height equal to its width is
drawn again), seeded, so the same command writes the same files. PNG is lossless, so only the resizing changes the pixels. ``OUT/manifest.json``
records the parameters and every file's size.

The true content of each picture is the whole 32x32 image, stretched: ``--fit squish`` recovers it
(up to resampling), ``crop`` loses the sides of every wide or tall picture, ``pad`` keeps it all at a
smaller scale with mirrored margins. The median shorter side is about 70 px, so the automatic image
size is 32 (CIFAR's own size). Then, for each fit:

    python bench/make_odd_folder.py /tmp/odd-cifar --data-dir ../shared/cifar-10-batches-bin
    cifarlab train --dataset folder:/tmp/odd-cifar --fit crop --preset fast --name odd-crop
    cifarlab train --dataset folder:/tmp/odd-cifar --fit squish --preset fast --name odd-squish
    cifarlab train --dataset folder:/tmp/odd-cifar --fit pad --preset fast --name odd-pad

and compare the test accuracies (the test pictures are fitted as the training ones were).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.data.cifar10 import read_bin, read_class_names  # noqa: E402

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


def default_data_dir() -> str | None:
    candidates = [os.environ.get("CIFARLAB_DATA"),
                  str(Path(__file__).resolve().parents[2] / "shared" / "cifar-10-batches-bin")]
    return next((c for c in candidates if c and (Path(c) / TEST_FILE).is_file()), None)


def read_split(data_dir: Path, files: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (N, 3, 32, 32) uint8 and labels of these batch files, in order."""
    images, labels, have = [], [], 0
    for name in files:
        if have >= n:
            break
        x, y = read_bin(data_dir / name)
        images.append(x[:n - have])
        labels.append(y[:n - have])
        have += len(images[-1])
    if have < n:
        raise SystemExit(f"asked for {n} images; {', '.join(files)} hold only {have}")
    return np.concatenate(images), np.concatenate(labels)


def write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str],
                rng: np.random.Generator, lo: int, hi: int) -> list[dict]:
    from PIL import Image

    for name in classes:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    sizes = rng.integers(lo, hi + 1, size=(len(images), 2))  # (width, height), independent
    while lo < hi and (same := sizes[:, 0] == sizes[:, 1]).any():  # non-square: draw those heights again
        sizes[same, 1] = rng.integers(lo, hi + 1, size=int(same.sum()))
    written = []
    for i, (img, label, (w, h)) in enumerate(zip(images, labels.tolist(), sizes.tolist())):
        picture = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
        if (w, h) != picture.size:
            picture = picture.resize((w, h), Image.Resampling.LANCZOS)
        rel = f"{split}/{classes[label]}/{i:05d}.png"
        picture.save(out / rel, compress_level=1)
        written.append({"file": rel, "width": w, "height": h})
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder to write (must be empty or not exist), e.g. /tmp/odd-cifar")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="cifar-10-batches-bin (default: $CIFARLAB_DATA, then ../shared/cifar-10-batches-bin)")
    p.add_argument("--train", type=int, default=20_000, help="training images, the first N (default: 20000)")
    p.add_argument("--test", type=int, default=2_000, help="test images, the first M (default: 2000)")
    p.add_argument("--min", type=int, default=32, help="smallest width or height in px (default: 32)")
    p.add_argument("--max", type=int, default=160, help="largest width or height in px (default: 160)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sizes (default: 0)")
    args = p.parse_args(argv)
    if not args.data_dir or not (Path(args.data_dir) / TEST_FILE).is_file():
        p.error("no CIFAR-10 binary data: give --data-dir (a cifar-10-batches-bin folder) or set CIFARLAB_DATA")
    if not 1 <= args.train <= 50_000 or not 1 <= args.test <= 10_000:
        p.error("--train must be 1..50000 and --test 1..10000")
    if not 1 <= args.min <= args.max <= 4096:
        p.error("need 1 <= --min <= --max <= 4096")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"{args.out} exists and is not an empty folder; give a new one")

    start = time.perf_counter()
    data_dir = Path(args.data_dir)
    rng = np.random.default_rng(args.seed)
    classes = read_class_names(data_dir / "batches.meta.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for split, batch_files, n in (("train", TRAIN_FILES, args.train), ("test", [TEST_FILE], args.test)):
        images, labels = read_split(data_dir, batch_files, n)
        files += write_split(args.out, split, images, labels, classes, rng, args.min, args.max)
    shorter = [min(f["width"], f["height"]) for f in files if f["file"].startswith("train/")]
    manifest = {"source": str(data_dir.resolve()), "train": args.train, "test": args.test,
                "sizes": f"width and height uniform in {args.min}..{args.max}, independent, never equal", "seed": args.seed,
                "resample": "PIL Lanczos", "median_train_shorter_side": float(np.median(shorter)), "files": files}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {args.train:,} training and {args.test:,} test pictures to {args.out} in "
          f"{time.perf_counter() - start:.1f} s (median training shorter side {np.median(shorter):.0f} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
