"""Shared test fixtures: tiny IDX datasets in the Fashion-MNIST file layout."""

import gzip
import struct

import numpy as np
import pytest


def write_idx(path, array):
    """Writes a gzip IDX file: magic 0x0800 + ndim (uint8 data), big-endian dims, bytes."""
    header = struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(directory, *, num_train, num_test, height, width, num_classes=3, seed=0):
    """A learnable toy dataset: class c is a bright bar at a class-specific row, plus noise.

    Returns {"train": (images, labels), "t10k": (images, labels)}.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in [("train", num_train), ("t10k", num_test)]:
        labels = rng.integers(0, num_classes, size=n)
        images = rng.integers(0, 60, size=(n, height, width))
        rows = (labels * height) // num_classes
        for i, r in enumerate(rows):
            images[i, r : r + max(height // num_classes, 1)] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
        arrays[prefix] = (images.astype(np.uint8), labels.astype(np.uint8))
    return arrays


@pytest.fixture
def tiny_idx_dir(tmp_path):
    """64 train / 24 test images of 12x12 in three classes."""
    directory = tmp_path / "idx"
    directory.mkdir()
    write_idx_dataset(directory, num_train=64, num_test=24, height=12, width=12)
    return directory
