"""Tests for invp_tf.data: IDX / tfds / folder sources with stable indices, and image checks."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from invp_tf import data
from invp_tf import input_pipeline
from tests import conftest

N, H, W = conftest.IDX_N, conftest.IDX_H, conftest.IDX_W


def _examples(source, **kwargs):
    return [tf.nest.map_structure(np.asarray, ex) for ex in source.dataset(**kwargs)]


def test_idx_source_matches_arrays(idx_dir):
    path, arrays = idx_dir
    source = data.load_source("fashion_mnist", "train", data_dir=str(path))
    assert (source.num_examples, source.num_classes, source.image_shape) == (N, 10, (H, W, 3))
    images, labels = arrays["train"]
    examples = _examples(source)
    assert [int(ex["index"]) for ex in examples] == list(range(N))
    for ex in examples:
        i = ex["index"]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(ex["image"], np.repeat(images[i][..., None], 3, axis=-1))
        assert ex["label"] == labels[i] and ex["label"].dtype == np.int32
    test = data.load_source("fashion_mnist", "test", data_dir=str(path))
    assert test.num_examples == 4


def test_idx_train_examples_and_exact_shuffle(idx_dir):
    path, arrays = idx_dir
    source = data.load_source("fashion_mnist", data_dir=str(path), train_examples=5)
    assert source.num_examples == 5
    examples = _examples(source, shuffle_files=True, seed=3)
    assert sorted(int(ex["index"]) for ex in examples) == list(range(5))
    for ex in examples:
        np.testing.assert_array_equal(ex["image"][..., 0], arrays["train"][0][ex["index"]])
    with pytest.raises(ValueError, match="exceeds"):
        data.load_source("fashion_mnist", data_dir=str(path), train_examples=N + 1)
    with pytest.raises(ValueError, match=">= 0"):
        data.load_source("fashion_mnist", data_dir=str(path), train_examples=-1)


def test_idx_errors(idx_dir, tmp_path):
    path, _ = idx_dir
    bad = path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 0x0801, N, H, W) + bytes(N * H * W))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*magic"):
        data.load_source("fashion_mnist", data_dir=str(path))
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, N, H, W) + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        data.load_source("fashion_mnist", data_dir=str(path))
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt IDX file .*train-images"):
        data.load_source("fashion_mnist", data_dir=str(path))
    missing = tmp_path / "nothere"
    with pytest.raises(
        FileNotFoundError, match=f"{missing}.*apt-get install dataset-fashion-mnist"
    ):
        data.load_source("fashion_mnist", data_dir=str(missing))
    os.remove(path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_source("fashion_mnist", "test", data_dir=str(path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="valid forms: .*tfds:NAME.*folder:"):
        data.load_source("cifar-10")


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist absent"
)
def test_real_fashion_mnist():
    source = data.load_source("fashion_mnist", "train")
    assert (source.num_examples, source.num_classes, source.image_shape) == (60000, 10, (28, 28, 3))
    ex = next(iter(source.dataset()))
    assert ex["image"].shape == (28, 28, 3) and int(ex["index"]) == 0


def test_tfds_id_to_index():
    ids = tf.constant(
        ["cifar10-train.tfrecord-00002-of-00003__4", "x-test.array_record-00000-of-00003__1"]
    )
    np.testing.assert_array_equal(data.tfds_id_to_index(ids, [5, 6, 7]).numpy(), [15, 1])


def _write_tfds_metadata(data_dir, shard_lengths):
    # Real metadata (split sizes, shard lengths) under data_dir, as a prepared dataset has.
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    splits = [
        tfds.core.SplitInfo(name=name, shard_lengths=lengths, num_bytes=0)
        for name, lengths in shard_lengths.items()
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_mock_cifar10_stable_indices(tmp_path):
    _write_tfds_metadata(tmp_path, {"train": [7], "test": [3]})
    with tfds.testing.mock_data(
        num_examples=7, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
    ):
        source = data.load_source("tfds:cifar10", "train", data_dir=str(tmp_path))
        assert (source.num_examples, source.num_classes, source.image_shape) == (7, 10, (32, 32, 3))
        for shuffle in (False, True):
            examples = _examples(source, shuffle_files=shuffle, seed=5)
            assert sorted(int(ex["index"]) for ex in examples) == list(range(7))
            assert examples[0]["image"].shape == (32, 32, 3)
            assert examples[0]["label"].dtype == np.int32
        # Read encoded, decoded after the train pipeline's shard filter.
        assert next(iter(source.dataset(decoded=False)))["image"].dtype == tf.string
        assert data.load_source("tfds:cifar10", "test", data_dir=str(tmp_path)).num_examples == 3
        with pytest.raises(ValueError, match="exceeds"):
            data.load_source("tfds:cifar10", data_dir=str(tmp_path), train_examples=8)


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(ValueError, match=f"not prepared.*{tmp_path}.*tfds build cifar10"):
        data.load_source("tfds:cifar10", data_dir=str(tmp_path))


def _write_png(path, value, size=(8, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = tf.fill([size[0], size[1], 3], tf.constant(value, tf.uint8))
    tf.io.write_file(str(path), tf.io.encode_png(image))


def test_folder_with_classes(tmp_path):
    # b/ sorts after a/; nested files belong to their first-level folder.
    _write_png(tmp_path / "b" / "y.png", 30)
    _write_png(tmp_path / "a" / "x.PNG", 10)
    _write_png(tmp_path / "a" / "sub" / "z.png", 20, size=(5, 9))
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    source = data.load_source(f"folder:{tmp_path}", "train")
    assert (source.num_examples, source.num_classes, source.image_shape) == (3, 2, None)
    assert [os.path.relpath(p, tmp_path) for p in source.paths] == [
        "a/sub/z.png",
        "a/x.PNG",
        "b/y.png",
    ]
    examples = _examples(source)
    assert [int(ex["index"]) for ex in examples] == [0, 1, 2]
    assert [int(ex["label"]) for ex in examples] == [0, 0, 1]
    assert [int(ex["image"][0, 0, 0]) for ex in examples] == [20, 10, 30]
    assert examples[0]["image"].shape == (5, 9, 3)
    assert data.load_source(f"folder:{tmp_path}", "test") is None
    assert data.find_unreadable_images(source) == []
    first2 = data.load_source(f"folder:{tmp_path}", train_examples=2)
    assert first2.num_examples == 2 and len(first2.paths) == 2


def test_folder_flat_and_splits(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _write_png(flat / f"{i}.png", i)
    source = data.load_source(f"folder:{flat}")
    assert source.num_classes is None
    assert [int(ex["label"]) for ex in _examples(source)] == [-1, -1, -1]

    split = tmp_path / "split"
    _write_png(split / "train" / "cat" / "1.png", 1)
    _write_png(split / "train" / "dog" / "2.jpg.png", 2)
    _write_png(split / "val" / "dog" / "3.png", 3)
    train = data.load_source(f"folder:{split}", "train")
    test = data.load_source(f"folder:{split}", "test")
    assert (train.num_examples, test.num_examples, test.num_classes) == (2, 1, 2)
    assert int(_examples(test)[0]["label"]) == 1  # "dog" has the same id in both splits


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=f"no images .*{tmp_path}"):
        data.load_source(f"folder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="nothere"):
        data.load_source(f"folder:{tmp_path / 'nothere'}")
    (tmp_path / "x.png").write_bytes(b"garbage bytes")
    with pytest.raises(ValueError, match="unreadable image: .*x.png"):
        data.load_source(f"folder:{tmp_path}")


def test_unreadable_image_found_and_catchable(tmp_path):
    _write_png(tmp_path / "a.png", 1)
    _write_png(tmp_path / "x.png", 2)
    source = data.load_source(f"folder:{tmp_path}")
    # Damaged after loading (or a truncated file with a valid signature).
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = str(tmp_path / "x.png")
    assert data.find_unreadable_images(source) == [bad]
    with pytest.raises(ValueError, match=f"unreadable image: {bad}"):
        data.check_images(source)
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(
            input_pipeline.train_pipeline(
                source, batch_size=2, image_size=8, view="none", seed=0, epoch=0
            )
        )


def test_tfds_test_falls_back_to_validation(tmp_path):
    _write_tfds_metadata(tmp_path, {"train": [4, 3], "validation": [2]})
    with tfds.testing.mock_data(
        num_examples=2, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
    ):
        source = data.load_source("tfds:cifar10", "test", data_dir=str(tmp_path))
        assert (source.split, source.num_examples) == ("validation", 2)
        assert data.load_source("tfds:cifar10", data_dir=str(tmp_path)).num_examples == 7
        with pytest.raises(ValueError, match="has splits"):
            data.load_source("tfds:cifar10", "extra", data_dir=str(tmp_path))
