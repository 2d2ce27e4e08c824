"""The two-stage form of the colour recipes (moco_v2, cifar) for the input pipeline.

Per image (`TwoStage.element`, mapped over single images): the crop and every random draw
of the recipe, with the per-image recipe's own seeds, so the same draws. Per batch
(`TwoStage.batch`, mapped over batches): the colour ops, flip and blur applied with each
image's own draws, so one op runs over the batch instead of dozens of small ops per image.

Where the native kernels build (`kernels.native_ops`), two ops run the batch stage:
`InvpColour` (the jitter in each image's random order, grayscale, flip) and
`InvpGaussianBlur` (the blur of the images drawn for it, in place). Elsewhere an XLA
program does the colour steps and TensorFlow's depthwise convolution the blur. Either way
the result is the per-image recipe's to float round-off (tests/batch_views_test.py), and
depends on nothing but the image and its seed, never on the batch it is in.
"""

from typing import NamedTuple

import tensorflow as tf

from invp_tf import augment
from invp_tf import kernels


class TwoStage(NamedTuple):
    """A recipe split for the input pipeline.

    element: fn(image, seed, image_size) -> (crop float32 [S, S, 3], draws: dict of
      per-image tensors), mapped over single images.
    batch: fn(crops [B, S, S, 3], draws batched) -> views [B, S, S, 3], mapped over batches.
    """

    element: object
    batch: object


def _coin(seed, p):
    """(applied bool [], fn seed [2]) of `random_apply(fn, image, seed, p)`."""
    coin_seed, fn_seed = tf.unstack(augment._split(seed, 2))
    if p >= 1.0:
        return tf.constant(True), fn_seed
    if p <= 0.0:
        return tf.constant(False), fn_seed
    return tf.random.stateless_uniform([], coin_seed) < p, fn_seed


def _jitter_draws(seed, applied, strengths):
    """The draws of `color_jitter(image, seed, *strengths)`: a dict of per-image tensors."""
    brightness, contrast, saturation, hue = strengths
    seeds = augment._split(seed, 5)
    factors = [
        tf.random.stateless_uniform([], seeds[i + 1], max(0.0, 1.0 - s), 1.0 + s)
        for i, s in enumerate((brightness, contrast, saturation))
    ]
    return {
        "jitter": applied,
        "jitter_order": tf.cast(tf.argsort(tf.random.stateless_uniform([4], seeds[0])), tf.int32),
        "jitter_factors": tf.stack(factors),  # [3]: brightness, contrast, saturation
        "hue": tf.random.stateless_uniform([], seeds[4], -hue, hue),
    }


def _on_rows(images, rows, fn, *args):
    """`fn(images[rows], *args[rows])` written back into `images` [B, ...]; rows [B] bool."""
    picked = tf.where(rows)[:, 0]

    def apply():
        done = fn(tf.gather(images, picked), *[tf.gather(a, picked) for a in args])
        return tf.tensor_scatter_nd_update(images, picked[:, None], done)

    return tf.cond(tf.size(picked) > 0, apply, lambda: images)


def _hue_rows(images, delta):
    # adjust_hue per image: [n, S, S, 3], delta [n] (fraction of the colour wheel).
    hsv = tf.image.rgb_to_hsv(images)
    h = hsv[..., 0] + delta[:, None, None]
    hsv = tf.stack([h - tf.floor(h), hsv[..., 1], hsv[..., 2]], axis=-1)
    return tf.clip_by_value(tf.image.hsv_to_rgb(hsv), 0.0, 1.0)


def _jitter_batch(images, draws, strengths):
    """`color_jitter` of each image [B, S, S, 3] with its own draws (random order kept).

    Straight-line elementwise code for XLA to fuse: every step computes the three blends
    and the hue shift and keeps the one that image's order names.
    """
    enabled = tf.constant([bool(s) for s in strengths])  # a zero strength is the identity
    applied = draws["jitter"]
    for step in range(4):
        op = draws["jitter_order"][:, step]  # [B]: 0 brightness, 1 contrast, 2 saturation, 3 hue
        grey = tf.image.rgb_to_grayscale(images)  # [B, S, S, 1]
        mean = tf.reduce_mean(grey, axis=[1, 2, 3], keepdims=True)  # [B, 1, 1, 1]
        # Brightness, contrast and saturation all blend with something: 0, the mean grey
        # level or the grey image (torchvision's _blend), clipped.
        factor = tf.gather(draws["jitter_factors"], tf.minimum(op, 2), batch_dims=1)
        is_op = [tf.reshape(op == i, [-1, 1, 1, 1]) for i in range(4)]
        other = tf.where(is_op[2], grey, tf.where(is_op[1], mean, 0.0))
        out = tf.clip_by_value(other + factor[:, None, None, None] * (images - other), 0, 1)
        if strengths[3]:
            out = tf.where(is_op[3], _hue_rows(images, draws["hue"]), out)
        keep = tf.reshape(applied & tf.gather(enabled, op), [-1, 1, 1, 1])
        images = tf.where(keep, out, images)
    return images


def _blur_radius(images):
    # augment.gaussian_blur's radius (kernel side 2r + 1 ~ 10%) for a batch of static side.
    return min(images.shape[1], images.shape[2]) // 20


def _blur_rows(images, sigma):
    # gaussian_blur per image: [n, S, S, 3], sigma [n]. The images fold into the channels
    # of one depthwise convolution, each with its own kernel.
    n, side = tf.shape(images)[0], images.shape[1]
    radius = _blur_radius(images)
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x[None, :] / sigma[:, None]))  # [n, K]
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
    kernel = tf.reshape(tf.repeat(tf.transpose(kernel), 3, axis=1), [-1, 1, n * 3, 1])
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    folded = tf.transpose(padded, [1, 2, 0, 3])  # [S + 2r, S + 2r, n, 3]
    folded = tf.reshape(folded, [1, side + 2 * radius, images.shape[2] + 2 * radius, n * 3])
    out = tf.nn.depthwise_conv2d(folded, kernel, [1, 1, 1, 1], "VALID")  # along H
    out = tf.nn.depthwise_conv2d(out, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
    out = tf.reshape(out, [side, images.shape[2], n, 3])
    return tf.transpose(out, [2, 0, 1, 3])


def _grayscale_batch(images, rows):
    grey = tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3])
    return tf.where(rows[:, None, None, None], grey, images)


def _flip_batch(images, rows):
    return tf.where(rows[:, None, None, None], tf.reverse(images, [2]), images)


def _flip_draw(seed):
    # tf.image.stateless_random_flip_left_right's own draw.
    return tf.random.stateless_uniform([], seed, 0.0, 1.0) < 0.5


_MOCO_JITTER = (0.4, 0.4, 0.4, 0.1)
_CIFAR_JITTER = (0.4, 0.4, 0.4, 0.4)


def _moco_v2_element(image, seed, image_size):
    """moco_v2_view's crop and draws: (crop [S, S, 3], draws)."""
    seeds = augment._split(seed, 5)
    crop = augment.random_resized_crop(image, seeds[0], image_size, scale=(0.2, 1.0))
    jitter, jitter_seed = _coin(seeds[1], 0.8)
    grey, _ = _coin(seeds[2], 0.2)
    blur, blur_seed = _coin(seeds[3], 0.5)
    draws = _jitter_draws(jitter_seed, jitter, _MOCO_JITTER)
    draws.update(
        grey=grey,
        blur=blur,
        sigma=tf.random.stateless_uniform([], blur_seed, 0.1, 2.0),
        flip=_flip_draw(seeds[4]),
    )
    return crop, draws


def _native_colour(images, draws, strengths, grey_first):
    """InvpColour: the XLA colour program's values to float round-off, in one pass or two
    per image, each step only where the image's draws ask for it."""
    return kernels.native_ops().invp_colour(
        images,
        draws["jitter"],
        draws["jitter_order"],
        draws["jitter_factors"],
        draws["hue"],
        tf.constant([bool(s) for s in strengths]),
        draws["grey"],
        draws["flip"],
        grey_first=grey_first,
    )


@tf.function(jit_compile=True)
def _moco_v2_colour(images, draws):
    # One XLA program: the elementwise ops fuse into a few passes over the batch. The flip
    # commutes with the blur (a symmetric kernel, symmetric padding), so it comes first.
    images = _jitter_batch(images, draws, _MOCO_JITTER)
    images = _grayscale_batch(images, draws["grey"])
    return _flip_batch(images, draws["flip"])


def _moco_v2_batch(images, draws):
    """moco_v2_view's jitter, grayscale, blur and flip over a batch [B, S, S, 3]."""
    if kernels.native_ops() is not None:
        images = _native_colour(images, draws, _MOCO_JITTER, grey_first=False)
        return kernels.native_ops().invp_gaussian_blur(
            images, draws["sigma"], draws["blur"], _blur_radius(images)
        )
    images = _moco_v2_colour(images, draws)
    # Outside XLA, whose CPU depthwise convolution is ~50x slower than TensorFlow's.
    return _on_rows(images, draws["blur"], _blur_rows, draws["sigma"])


def _cifar_element(image, seed, image_size):
    """cifar_view's crop and draws: (crop [S, S, 3], draws)."""
    seeds = augment._split(seed, 4)
    crop = augment.random_resized_crop(image, seeds[0], image_size, scale=(0.2, 1.0))
    grey, _ = _coin(seeds[1], 0.2)
    draws = _jitter_draws(seeds[2], tf.constant(True), _CIFAR_JITTER)
    draws.update(grey=grey, flip=_flip_draw(seeds[3]))
    return crop, draws


def _cifar_batch(images, draws):
    """cifar_view's grayscale, jitter and flip over a batch [B, S, S, 3]."""
    if kernels.native_ops() is not None:
        return _native_colour(images, draws, _CIFAR_JITTER, grey_first=True)
    return _cifar_colour(images, draws)


@tf.function(jit_compile=True)
def _cifar_colour(images, draws):
    images = _grayscale_batch(images, draws["grey"])
    images = _jitter_batch(images, draws, _CIFAR_JITTER)
    return _flip_batch(images, draws["flip"])


_TWO_STAGE = {
    augment.cifar_view: TwoStage(_cifar_element, _cifar_batch),
    augment.moco_v2_view: TwoStage(_moco_v2_element, _moco_v2_batch),
}


def two_stage(view):
    """The TwoStage form of a recipe of RECIPES, or None (a recipe without colour ops)."""
    return _TWO_STAGE.get(view)
