"""Tests for benchmarks.input_pipeline: the JPEG folder generator and the tf.data reference."""

import numpy as np
import tensorflow as tf

from benchmarks import input_pipeline
from invp_tf import data


def test_jpeg_folder_is_an_imagenet_like_folder_dataset(tmp_path):
    paths = input_pipeline.write_jpeg_folder(str(tmp_path), 6, num_classes=3)
    assert len(paths) == 6 and all(p.endswith(".jpg") for p in paths)
    source = data.load_source(f"folder:{tmp_path}", "train")
    assert source.num_examples == 6 and source.num_classes == 3
    for path in paths:
        encoded = tf.io.read_file(path)
        assert bool(tf.io.is_jpeg(encoded))
        h, w, c = tf.image.extract_jpeg_shape(encoded).numpy()
        assert c == 3 and 300 <= min(h, w) <= 375 and 400 <= max(h, w) <= 500
    # Photograph-like content: not one flat colour, and about as large as a photo.
    image = tf.io.decode_jpeg(tf.io.read_file(paths[0])).numpy()
    assert image.std() > 10
    assert tf.io.gfile.stat(paths[0]).length > 20_000


def test_reference_pipeline_views_are_deterministic_views_in_range(tmp_path):
    paths = input_pipeline.write_jpeg_folder(str(tmp_path), 5)

    def batches(recipe, epoch):
        ds = input_pipeline.reference_pipeline(
            paths, batch_size=2, image_size=16, recipe=recipe, seed=1, epoch=epoch
        )
        return [(x.numpy(), i.numpy()) for x, i in ds]

    for recipe in ("moco_v2", "crop_flip"):
        first = batches(recipe, 0)
        assert len(first) == 2  # 5 images, batches of 2, the partial one dropped
        for (x, i), (y, j) in zip(first, batches(recipe, 0), strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(i, j)
            assert x.shape == (2, 16, 16, 3) and x.min() >= 0.0 and x.max() <= 1.0
        assert not np.array_equal(first[0][0], batches(recipe, 1)[0][0])
