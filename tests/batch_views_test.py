"""Tests for invp_tf.batch_views: the two-stage recipes against the per-image recipes, and
the native colour and blur ops against the XLA / TensorFlow-op batch stage."""

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import augment
from invp_tf import batch_views
from invp_tf import kernels

S = 24  # output side used throughout; small to keep the tests fast


@pytest.fixture(name="native", params=[True, False], ids=["native", "tf_ops"])
def fixture_native(request, monkeypatch):
    """Runs a test with the native kernels on, then off; restored afterwards."""
    monkeypatch.setenv("INVP_TF_NATIVE", "1" if request.param else "0")
    kernels.native_ops.cache_clear()
    if request.param:
        assert kernels.native_ops() is not None, "the native kernels did not build"
    yield request.param
    kernels.native_ops.cache_clear()


@pytest.fixture(name="ops")
def fixture_ops():
    ops = kernels.native_ops()
    assert ops is not None, "the native kernels did not build (see the warning)"
    return ops


def _two_stage_views(name, images, seeds, size):
    stages = batch_views.two_stage(augment.get_view(name))
    outs = [stages.element(x, s, size) for x, s in zip(images, seeds, strict=True)]
    crops = tf.stack([crop for crop, _ in outs])
    draws = {k: tf.stack([d[k] for _, d in outs]) for k in outs[0][1]}
    return stages, crops, draws


@pytest.mark.parametrize("name", ["moco_v2", "cifar"])
def test_two_stage_recipe_is_the_per_image_recipe(name, native):
    # The same seeds give the same draws; only float round-off differs (XLA's fused hue,
    # the batch's folded blur, or the native ops). Enough images that every branch (jitter
    # on/off, each order, grey, blur, flip) is taken.
    rng = np.random.default_rng(7)
    images = [tf.constant(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(12)]
    seeds = [tf.constant([11, i], tf.int64) for i in range(12)]
    view = augment.get_view(name)
    want = np.stack([view(x, s, S).numpy() for x, s in zip(images, seeds, strict=True)])
    stages, crops, draws = _two_stage_views(name, images, seeds, S)
    got = stages.batch(crops, draws).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    for key in ("jitter", "grey", "flip") + (("blur",) if name == "moco_v2" else ()):
        assert 0 < np.sum(draws[key].numpy()) < 12 or key == "jitter", key
    # A view depends on its image and seed only, not on the batch it is in.
    for i in (0, 5):
        alone = stages.batch(crops[i : i + 1], {k: v[i : i + 1] for k, v in draws.items()})
        np.testing.assert_array_equal(alone.numpy()[0], got[i])


def _random_draws(n, seed, jitter_p=0.8):
    """Draws as the elements make them, with every order and op represented."""
    rng = np.random.default_rng(seed)
    return {
        "jitter": tf.constant(rng.random(n) < jitter_p),
        "jitter_order": tf.constant(np.stack([rng.permutation(4) for _ in range(n)]), tf.int32),
        "jitter_factors": tf.constant(rng.uniform(0.6, 1.4, (n, 3)), tf.float32),
        "hue": tf.constant(rng.uniform(-0.1, 0.1, n), tf.float32),
        "grey": tf.constant(rng.random(n) < 0.3),
        "flip": tf.constant(rng.random(n) < 0.5),
        "blur": tf.constant(rng.random(n) < 0.5),
        "sigma": tf.constant(rng.uniform(0.1, 2.0, n), tf.float32),
    }


@pytest.mark.parametrize(
    "program, strengths, grey_first",
    [
        (batch_views._moco_v2_colour, batch_views._MOCO_JITTER, False),
        (batch_views._cifar_colour, batch_views._CIFAR_JITTER, True),
        (batch_views._moco_v2_colour, (0.4, 0.0, 0.4, 0.0), False),  # zero strengths: off
    ],
)
def test_native_colour_is_the_xla_program(ops, program, strengths, grey_first, monkeypatch):
    # Natural-looking images (smooth gradients plus noise, some saturated pixels, some grey
    # ones) so the hue formulas meet ties (r == g, zero range) as well as generic pixels.
    n, h, w = 48, 20, 17
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 1, h * w, dtype=np.float32).reshape(1, h, w, 1)
    images = np.clip(ramp + rng.normal(0, 0.3, (n, h, w, 3)), 0, 1).astype(np.float32)
    images[:4] = images[:4, ..., :1]  # grey pixels: zero saturation, hue 0
    images[4:8, :5] = 1.0  # saturated corners
    draws = _random_draws(n, 5)
    monkeypatch.setattr(batch_views, "_MOCO_JITTER", strengths)  # the XLA program's strengths
    program = tf.function(program.python_function, jit_compile=True)  # retraced with them
    want = program(tf.constant(images), draws).numpy()
    got = ops.invp_colour(
        images,
        draws["jitter"],
        draws["jitter_order"],
        draws["jitter_factors"],
        draws["hue"],
        [bool(s) for s in strengths],
        draws["grey"],
        draws["flip"],
        grey_first=grey_first,
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.abs(got - images).max() > 0.1  # the steps did something
    untouched = ~(draws["jitter"].numpy() | draws["grey"].numpy() | draws["flip"].numpy())
    np.testing.assert_array_equal(got[untouched], images[untouched])  # bitwise identity


def test_native_colour_orders_matter_and_bad_inputs_are_named(ops):
    image = np.random.default_rng(0).random((1, 6, 5, 3), dtype=np.float32)

    def run(order, **overrides):
        args = dict(
            jitter=[True],
            order=[order],
            factors=[[1.3, 0.5, 1.4]],
            hue=[0.05],
            enabled=[True] * 4,
            grey=[False],
            flip=[False],
        )
        args.update(overrides)
        return ops.invp_colour(image, *args.values()).numpy()

    # Brightness then contrast is not contrast then brightness (clipping, the mean moves).
    assert np.abs(run([0, 1, 2, 3]) - run([1, 0, 2, 3])).max() > 1e-3
    np.testing.assert_array_equal(run([0, 1, 2, 3], jitter=[False]), image)
    flipped = run([0, 1, 2, 3], jitter=[False], flip=[True])
    np.testing.assert_array_equal(flipped, image[:, :, ::-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"order must be \[1, 4\]"):
        run([0, 1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"order\[0, 2\] = 7 is not in"):
        run([0, 1, 7, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"enabled must be \[4\]"):
        run([0, 1, 2, 3], enabled=[True])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be \[B, H, W, 3\]"):
        ops.invp_colour(image[..., :1], [True], [[0, 1, 2, 3]], [[1, 1, 1]], [0.0],
                        [True] * 4, [False], [False])  # fmt: skip


def test_native_blur_of_chosen_rows_is_the_tf_ops_blur(ops):
    # Rows drawn for the blur equal batch_views' TensorFlow-op blur; the others are the
    # input bitwise (in place where TensorFlow forwards the buffer, copied otherwise).
    rng = np.random.default_rng(4)
    images = rng.random((9, 40, 33, 3), dtype=np.float32)
    draws = _random_draws(9, 6)
    radius = min(40, 33) // 20
    got = ops.invp_gaussian_blur(images, draws["sigma"], draws["blur"], radius).numpy()
    want = batch_views._on_rows(
        tf.constant(images), draws["blur"], batch_views._blur_rows, draws["sigma"]
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    rows = draws["blur"].numpy()
    assert 0 < rows.sum() < 9
    np.testing.assert_array_equal(got[~rows], images[~rows])
    assert np.abs(got[rows] - images[rows]).max() > 1e-2
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"apply must be \[9\]"):
        ops.invp_gaussian_blur(images, draws["sigma"], [True], radius)


def test_two_stage_forms_are_named():
    assert batch_views.two_stage(augment.crop_flip_view) is None  # the demo's view: one stage
    assert batch_views.two_stage(augment.moco_v2_view).batch is batch_views._moco_v2_batch
