"""Shared test fixtures: tiny IDX datasets in the Fashion-MNIST file layout."""

import dataclasses
import gzip
import struct

import keras
import numpy as np
import pytest

from invp_tf import baselines
from invp_tf import config as config_lib
from invp_tf import distribute
from invp_tf import training

# Two logical CPU devices for the mirrored tests. It has to happen before
# TensorFlow runs its first op, so here, when pytest loads the fixtures; one
# device stays the default for every other test.
distribute.configure_cpu_devices(2)


@pytest.fixture(autouse=True)
def private_baseline_cache(tmp_path_factory, monkeypatch):
    """Each test's evaluations cache baselines in a folder of their own, never the user's."""
    folder = tmp_path_factory.mktemp("baseline_cache")
    monkeypatch.setattr(baselines, "default_folder", lambda: folder)
    return folder


def write_idx(path, array):
    """Writes a gzip IDX file: magic 0x0800 + ndim (uint8 data), big-endian dims, bytes."""
    header = struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# The random IDX split of tests/data_test.py and tests/pipelines_test.py: N train images of
# H x W (random pixels and labels) and 4 test images.
IDX_N, IDX_H, IDX_W = 12, 6, 5


@pytest.fixture
def idx_dir(tmp_path):
    """(folder, {"train" | "t10k": (images, labels)}) of a random IDX dataset."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in [("train", IDX_N), ("t10k", 4)]:
        images = rng.integers(0, 256, size=(n, IDX_H, IDX_W), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return tmp_path, arrays


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


def tiny_config(data_dir, workdir, **overrides):
    """A Config small enough to train a few epochs in seconds (3 epochs, L_inv from epoch 1)."""
    config = config_lib.Config(
        workdir=str(workdir),
        dataset="fashion_mnist",
        data_dir=str(data_dir),
        epochs=3,
        batch_size=16,
        image_size=12,
        augment="crop_flip",
        crop_scale=0.5,
        encoder="resnet18_cifar",
        width_multiplier=0.0625,
        head="mlp",
        embedding_dim=16,
        temperature=0.2,
        num_neighbors=2,
        num_layers=2,
        num_positives=3,
        num_background=32,
        rampup_epochs=1,
        knn_method="brute_force",
        learning_rate=0.05,
        weight_decay=5e-4,
        knn_k=10,
        seed=3,
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by the whole test process
    (a second MirroredStrategy in one process can abort the first one's collectives)."""
    return distribute.make_strategy("mirrored")


class Interrupt(Exception):
    """Raised by InterruptAt: a crash in the middle of an epoch."""


class InterruptAt(keras.callbacks.Callback):
    """Raises in the middle of the given epoch (epochs count across fit calls)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.fits, self.epoch, self.batch = 0, epoch, batch

    def on_train_begin(self, logs=None):
        self.fits += 1

    def on_train_batch_end(self, batch, logs=None):
        if self.fits - 1 == self.epoch and batch == self.batch:
            raise Interrupt()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The Config of a 2-epoch run (tiny_config) on 64 train / 24 test 12x12 images of three
    classes, trained once per test module that asks for it."""
    root = tmp_path_factory.mktemp("tiny_run")
    idx = root / "idx"
    idx.mkdir()
    write_idx_dataset(idx, num_train=64, num_test=24, height=12, width=12)
    config = tiny_config(idx, root / "run", epochs=2)
    training.train_and_evaluate(config, config.workdir)
    return config
