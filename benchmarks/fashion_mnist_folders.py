"""Write Fashion-MNIST as class folders of PNGs, the input of `slimfit finetune --task image-classification`.

Reads the four gzip'd IDX files (60,000 train and 10,000 test 28x28 grey images, 10 classes) that the Debian package
``dataset-fashion-mnist`` installs (``dpkg -L dataset-fashion-mnist`` lists them: /usr/share/datasets/fashion-mnist)
and writes the first ``--per-class`` train and ``--test-per-class`` test images of each class (the files are already
shuffled) as ``OUT/train/<class>/<index>.png`` and ``OUT/test/<class>/<index>.png``, ``index`` being the image's
position in its IDX file. ``--classes`` writes only the classes named (e.g. disjoint classes for pretraining and
for fine-tuning).

Usage: python benchmarks/fashion_mnist_folders.py OUT [--per-class 200] [--test-per-class 50] [--classes NAME ...]
       [--source DIR]
then: slimfit finetune --task image-classification --data OUT/train --eval-data OUT/test --model VIT_FOLDER
"""

from __future__ import annotations

import argparse
import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Label i of the IDX files, as folder names (Zalando's names with "/" and spaces replaced).
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
SPLITS = {"train": "train", "test": "t10k"}  # output folder -> IDX file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes with 3 dimensions / 1 dimension


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of a gzip'd IDX file (big-endian header: magic, then one int32 per dimension)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found = struct.unpack_from(">i", data)[0]
    if found != magic:
        raise SystemExit(f"{path}: IDX magic number {found}, expected {magic}")
    shape = struct.unpack_from(f">{magic & 0xFF}i", data, 4)
    offset = 4 + 4 * len(shape)
    size = int(np.prod(shape))
    if len(data) - offset != size:
        raise SystemExit(f"{path}: {len(data) - offset} bytes of data; the header's shape {shape} needs {size}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def write_split(source: Path, prefix: str, target: Path, per_class: int, classes: Sequence[str] = CLASSES) -> int:
    """PNGs of the first ``per_class`` images of each of ``classes``; returns how many were written."""
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", IMAGES_MAGIC)
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", LABELS_MAGIC)
    written = 0
    for name in classes:
        label = CLASSES.index(name)
        folder = target / name
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")  # 2-D uint8: mode L
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (its train/ and test/ must not exist yet)")
    parser.add_argument("--per-class", type=int, default=200, help="train images per class (at most 6,000)")
    parser.add_argument("--test-per-class", type=int, default=50, help="test images per class (at most 1,000)")
    parser.add_argument(
        "--classes",
        nargs="+",
        choices=CLASSES,
        default=CLASSES,
        metavar="NAME",
        help=f"classes to write (default: all): {', '.join(CLASSES)}",
    )
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"folder of the IDX files (default {SOURCE})")
    args = parser.parse_args(argv)
    for option, value in (("--per-class", args.per_class), ("--test-per-class", args.test_per_class)):
        if value < 1:
            parser.error(f"{option}: {value} must be at least 1")
    for split, prefix in SPLITS.items():
        target = args.out / split
        if target.exists():  # stale PNGs of an earlier, larger run would mix in
            parser.error(f"{target} exists; choose another OUT or remove it")
        per_class = args.per_class if split == "train" else args.test_per_class
        count = write_split(args.source, prefix, target, per_class, sorted(set(args.classes), key=CLASSES.index))
        print(f"{target}: {count} images")


if __name__ == "__main__":
    main()
