"""Tests for invp_tf.input_pipeline: the train / eval pipelines over IDX and folder sources.

(tests/input_pipeline_test.py tests the benchmark of the same name, benchmarks.input_pipeline.)
"""

import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import augment
from invp_tf import data
from invp_tf import input_pipeline
from tests import conftest
from tests.conftest import write_idx_dataset

N, H, W = conftest.IDX_N, conftest.IDX_H, conftest.IDX_W


def _write_png(path, value, size=(8, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = tf.fill([size[0], size[1], 3], tf.constant(value, tf.uint8))
    tf.io.write_file(str(path), tf.io.encode_png(image))


def _batches(source, **kwargs):
    return [
        tf.nest.map_structure(np.asarray, b)
        for b in input_pipeline.train_pipeline(source, **kwargs)
    ]


def test_train_pipeline_deterministic(idx_dir):
    path, _ = idx_dir
    source = data.load_source("fashion_mnist", data_dir=str(path))
    kwargs = {"batch_size": 5, "image_size": 8, "view": augment.cifar_view, "seed": 1}
    first = _batches(source, epoch=0, **kwargs)
    again = _batches(source, epoch=0, **kwargs)
    other = _batches(source, epoch=1, **kwargs)
    assert len(first) == N // 5  # drop_remainder
    images, indices, labels = first[0]
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.float32
    assert indices.dtype == np.int32 and labels.dtype == np.int32
    for a, b in zip(first, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for batches in (first, other):
        seen = np.concatenate([b[1] for b in batches])
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(N))
    assert not np.array_equal(
        np.concatenate([b[1] for b in first]), np.concatenate([b[1] for b in other])
    )
    # A bounded buffer (the path for large tfds data) is deterministic too.
    bounded = {**kwargs, "view": "crop_flip", "epoch": 2, "shuffle_buffer": 4}
    for a, b in zip(_batches(source, **bounded), _batches(source, **bounded), strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_eval_pipeline_keeps_partial_batch(idx_dir):
    path, _ = idx_dir
    source = data.load_source("fashion_mnist", data_dir=str(path))
    batches = list(input_pipeline.eval_pipeline(source, batch_size=5, image_size=8))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    assert batches[0][0].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(N))


def test_sharded_workers_read_and_decode_only_their_own_files(tmp_path):
    """Shards are cut before decoding: a file of another worker's part is never read."""
    for i in range(8):
        _write_png(tmp_path / f"{i:02d}.png", 10 * i)
    source = data.load_source(f"folder:{tmp_path}", "train")

    def indices(shard_index):
        pipeline = input_pipeline.train_pipeline(
            source, batch_size=2, image_size=4, view="none", seed=0, epoch=0,
            global_batch_size=4, shard_index=shard_index, num_shards=2,
        )  # fmt: skip
        return sorted(int(i) for _, batch, _ in pipeline for i in batch.numpy())

    theirs = indices(1)
    # Break one of worker 1's files (it keeps the PNG signature the loader checks).
    path = source.paths[theirs[0]]
    with open(path, "rb") as f:
        head = f.read(40)
    with open(path, "wb") as f:
        f.write(head)
    mine = indices(0)  # does not touch the broken file
    assert sorted(mine + theirs) == list(range(8))
    with pytest.raises(tf.errors.InvalidArgumentError):
        indices(1)


@pytest.mark.parametrize("recipe", ["moco_v2", "crop_flip"])
def test_folder_pipeline_views_are_the_recipe_of_each_index(tmp_path, recipe):
    # The pipeline crops the encoded files and runs the colour ops per batch; each view is
    # still the per-image recipe of (decoded image, [seed base, index]) to round-off.
    rng = np.random.default_rng(0)
    for i in range(6):
        image = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(image))
    source = data.load_source(f"folder:{tmp_path}", "train")
    view = augment.get_view(recipe)
    batches = list(
        input_pipeline.train_pipeline(
            source, batch_size=3, image_size=16, view=view, seed=2, epoch=1
        )
    )
    base = input_pipeline._view_seed_base(2, 1)
    for images, indices, _ in batches:
        for image, index in zip(images.numpy(), indices.numpy(), strict=True):
            decoded = tf.io.decode_png(tf.io.read_file(source.paths[index]))
            want = view(decoded, tf.constant([base, index], tf.int64), 16)
            np.testing.assert_allclose(image, want.numpy(), atol=2e-5)


def test_view_map_runs_as_many_calls_as_the_host_has_cores(idx_dir, monkeypatch):
    # A 48-core host, simulated by a 48-thread private pool: the view runs 48 calls at once
    # (AUTOTUNE without the autotuner would stop at 16).
    path, _ = idx_dir
    big = path / "big"
    big.mkdir()
    write_idx_dataset(big, num_train=96, num_test=4, height=4, width=4)
    source = data.load_source("fashion_mnist", data_dir=str(big))
    monkeypatch.setattr(input_pipeline, "host_cores", lambda: 48)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def probe(x):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return x

    def view(image, seed, size):
        del seed
        x = tf.ensure_shape(tf.py_function(probe, [image], tf.uint8), image.shape)
        return tf.image.resize(tf.cast(x, tf.float32) / 255.0, [size, size])

    ds = input_pipeline.train_pipeline(
        source, batch_size=48, image_size=4, view=view, seed=0, epoch=0
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = 48
    next(iter(ds.with_options(options)))
    assert state["most"] >= 40, state
