"""Tests for invp_tf.augment: shapes, ranges, determinism, eager == tf.data."""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import augment
from invp_tf import kernels

S = 24  # output side used throughout; small to keep the tests fast


def _grey():
    rng = np.random.default_rng(0)
    return tf.constant(rng.integers(0, 256, size=(28, 28, 1), dtype=np.uint8))


def _rgb():
    rng = np.random.default_rng(1)
    return tf.constant(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8))


SEED = tf.constant([3, 7], tf.int64)
OTHER_SEED = tf.constant([3, 8], tf.int64)
RECIPES = sorted(augment.RECIPES)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("make_image", [_grey, _rgb])
def test_recipe_shape_range_determinism(name, make_image):
    view = augment.get_view(name)
    image = make_image()
    out = view(image, SEED, S)
    assert out.dtype == tf.float32
    assert out.shape == (S, S, 3)
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    np.testing.assert_array_equal(out.numpy(), view(image, SEED, S).numpy())
    if name != "none":
        assert not np.array_equal(out.numpy(), view(image, OTHER_SEED, S).numpy())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_eager_equals_tf_data(name):
    view = augment.get_view(name)
    image = _rgb()
    seeds = tf.constant([[0, 1], [0, 2], [5, 9]], tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: view(image, s, S))
    assert ds.element_spec.shape == (S, S, 3)  # static shape in graph mode
    for seed, out in zip(seeds, ds, strict=True):
        np.testing.assert_allclose(out.numpy(), view(image, seed, S).numpy(), atol=1e-6)


def test_eval_view_shapes_and_tf_data():
    big = tf.constant(np.random.default_rng(2).integers(0, 256, (80, 60, 3), dtype=np.uint8))
    for image in [_grey(), _rgb(), big]:
        out = augment.eval_view(image, S)
        assert out.shape == (S, S, 3) and out.dtype == tf.float32
        ds = tf.data.Dataset.from_tensors(image).map(lambda x: augment.eval_view(x, S))
        assert ds.element_spec.shape == (S, S, 3)
        np.testing.assert_allclose(next(iter(ds)).numpy(), out.numpy(), atol=1e-6)


def test_eval_view_center_crops_large_images():
    # Left half black, right half white, large image: the center crop keeps both halves.
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, 50:] = 255
    out = augment.eval_view(tf.constant(image), S).numpy()
    assert out[:, 0].max() < 0.01 and out[:, -1].min() > 0.99


def test_to_float_rgb():
    out = augment.to_float_rgb(_grey())
    assert out.shape == (28, 28, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(out[..., 0].numpy(), _grey()[..., 0].numpy() / 255.0, atol=1e-6)
    floats = tf.fill([4, 5, 3], 0.5)
    np.testing.assert_array_equal(augment.to_float_rgb(floats).numpy(), floats.numpy())


def test_random_resized_crop_constant_image_stays_constant():
    image = tf.fill([40, 30, 3], tf.constant(100, tf.uint8))
    for i in range(5):
        out = augment.random_resized_crop(image, tf.constant([i, 1]), S)
        np.testing.assert_allclose(out.numpy(), 100 / 255.0, atol=1e-5)


def test_random_resized_crop_of_grey_equals_the_crop_of_its_rgb_tiling():
    # Grey crops are resized on one channel and tiled after: exactly the tile-first result.
    for i in range(4):
        seed = tf.constant([i, 5], tf.int64)
        begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(_grey()),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.2, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        rgb = tf.tile(tf.slice(_grey(), begin, box), [1, 1, 3])
        rgb = tf.image.convert_image_dtype(rgb, tf.float32)
        want = tf.image.resize(rgb, [56, 56], antialias=True)
        out = augment.random_resized_crop(_grey(), seed, 56)
        np.testing.assert_array_equal(out.numpy(), tf.clip_by_value(want, 0.0, 1.0).numpy())


def test_random_resized_crop_unknown_channels_in_graph():
    # decode_image without channels gives an unknown channel count; the crop must fix it.
    fn = tf.function(
        lambda x, s: augment.random_grayscale(augment.random_resized_crop(x, s, S), s, 1.0),
        input_signature=[tf.TensorSpec([None, None, None], tf.uint8), tf.TensorSpec([2], tf.int32)],
    )
    out = fn(_rgb(), tf.constant([1, 2]))
    assert out.shape == (S, S, 3)


def test_grayscale_channels_equal():
    x = augment.to_float_rgb(_rgb())
    out = augment.random_grayscale(x, SEED, p=1.0).numpy()
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(augment.random_grayscale(x, SEED, p=0.0).numpy(), x.numpy())


def test_random_apply_probability():
    x = tf.zeros([2, 2, 3])
    hits = [
        float(augment.random_apply(lambda y, s: y + 1.0, x, tf.constant([i, 0]), 0.3)[0, 0, 0])
        for i in range(200)
    ]
    assert 0.15 < np.mean(hits) < 0.45


def test_gaussian_blur_constant_and_smoothing():
    const = tf.fill([40, 40, 3], 0.3)
    out = augment.gaussian_blur(const, SEED, sigma=(1.0, 2.0))
    np.testing.assert_allclose(out.numpy(), 0.3, atol=1e-5)
    noise = tf.constant(np.random.default_rng(3).random((40, 40, 3)), tf.float32)
    blurred = augment.gaussian_blur(noise, SEED, sigma=(1.5, 2.0))
    assert blurred.shape == (40, 40, 3)
    assert float(tf.math.reduce_std(blurred)) < float(tf.math.reduce_std(noise))
    np.testing.assert_allclose(
        float(tf.reduce_mean(blurred)), float(tf.reduce_mean(noise)), atol=0.02
    )


def test_color_jitter_range_and_zero_strength_identity():
    x = augment.to_float_rgb(_rgb())
    out = augment.color_jitter(x, SEED, 0.4, 0.4, 0.4, 0.4)
    assert out.shape == (40, 30, 3)
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    np.testing.assert_array_equal(augment.color_jitter(x, SEED, 0, 0, 0, 0).numpy(), x.numpy())


def test_random_flip_is_a_mirror_or_identity():
    x = _rgb().numpy()
    outs = [augment.random_flip(x, tf.constant([i, 0])).numpy() for i in range(10)]
    assert all(np.array_equal(o, x) or np.array_equal(o, x[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, x[:, ::-1]) for o in outs)


def test_crop_flip_scale_partial():
    view = functools.partial(augment.crop_flip_view, scale=(1.0, 1.0))
    image = np.zeros((30, 30, 3), np.uint8)
    image[:, :15] = 255  # full-image crop: exactly a resize (possibly mirrored)
    out = view(tf.constant(image), SEED, 30).numpy()
    assert {round(out[0, 0, 0]), round(out[0, -1, 0])} == {0.0, 1.0}


def test_get_view_unknown_name():
    with pytest.raises(ValueError, match="crop_flip"):
        augment.get_view("simclr")


# ---------------------------------------------------------------------------
# The input pipeline's forms: encoded files and the two-stage colour recipes.


def _jpeg(image, quality=95, chroma_downsampling=False):
    return tf.io.encode_jpeg(
        tf.constant(image), quality=quality, chroma_downsampling=chroma_downsampling
    )


@pytest.mark.parametrize("scale", [(0.2, 1.0), (1.0, 1.0)])
def test_crop_of_an_encoded_jpeg_decodes_the_same_window(scale):
    # The same stateless box, read off the JPEG header; decode_and_crop_jpeg gives the
    # pixels of decode-then-crop (without chroma subsampling: exactly). Crops above S keep
    # the antialiased resize (the native kernel's: tf.image.resize's to float round-off).
    image = np.random.default_rng(4).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for subsampled in (False, True):
        encoded = _jpeg(image, chroma_downsampling=subsampled)
        decoded = tf.io.decode_jpeg(encoded, channels=3)
        for i in range(6):
            seed = tf.constant([i, 2], tf.int64)
            want = augment.random_resized_crop(decoded, seed, 16, scale=scale).numpy()
            got = augment.random_resized_crop(encoded, seed, 16, scale=scale).numpy()
            if not subsampled:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            else:
                # 4:2:0 chroma at the window's right edge is upsampled from the edge
                # instead of the next block: the last column only moves, a little.
                np.testing.assert_allclose(got[:, :-2], want[:, :-2], rtol=0, atol=1e-6)
                assert np.abs(got - want).max() < 0.1


@pytest.fixture(name="no_native")
def fixture_no_native(monkeypatch):
    """The native kernels turned off (tf.image.resize in the views); restored afterwards."""
    monkeypatch.setenv("INVP_TF_NATIVE", "0")
    kernels.native_ops.cache_clear()
    yield
    kernels.native_ops.cache_clear()


def test_native_resize_of_encoded_crops_matches_tf_image_resize(no_native):
    # The views of a folder of JPEGs with and without the native resize: float round-off.
    image = np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    encoded, decoded = _jpeg(image), tf.io.decode_jpeg(_jpeg(image), channels=3)
    seeds = [tf.constant([i, 3], tf.int64) for i in range(8)]
    fallback = [augment.random_resized_crop(encoded, s, 24).numpy() for s in seeds]
    for s, view in zip(seeds, fallback, strict=True):  # exactly the decoded image's crop
        np.testing.assert_array_equal(view, augment.random_resized_crop(decoded, s, 24))
    os.environ["INVP_TF_NATIVE"] = "1"
    kernels.native_ops.cache_clear()
    assert kernels.native_ops() is not None
    native = [augment.random_resized_crop(encoded, s, 24).numpy() for s in seeds]
    np.testing.assert_allclose(np.stack(native), np.stack(fallback), rtol=0, atol=1e-6)
    assert any((n != f).any() for n, f in zip(native, fallback, strict=True))  # its own op


def test_crop_of_an_encoded_file_upsamples_without_antialias_and_reads_png():
    # A crop smaller than S on both sides: plain bilinear, equal to the antialiased resize
    # up to round-off. A PNG (no crop-window decode) takes the same box.
    image = np.random.default_rng(5).integers(0, 256, (20, 18, 3), dtype=np.uint8)
    for encoded in (_jpeg(image), tf.io.encode_png(image)):
        decoded = tf.io.decode_image(encoded, channels=3)
        for i in range(4):
            seed = tf.constant([i, 9], tf.int64)
            want = augment.random_resized_crop(decoded, seed, 32)
            got = augment.random_resized_crop(encoded, seed, 32)
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_grey_jpeg_is_read_as_rgb():
    grey = np.random.default_rng(6).integers(0, 256, (30, 30, 1), dtype=np.uint8)
    encoded = tf.io.encode_jpeg(grey)
    out = augment.crop_flip_view(encoded, SEED, S)
    assert out.shape == (S, S, 3)
    np.testing.assert_array_equal(out[..., 0].numpy(), out[..., 2].numpy())


def test_two_stage_and_encoded_forms_are_named():
    assert augment.takes_encoded(functools.partial(augment.crop_flip_view, scale=(0.7, 1.0)))
    assert not augment.takes_encoded(augment.resize_view)
