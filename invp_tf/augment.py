"""Deterministic view augmentations: one image in, one view out.

Every random choice is a stateless TF op driven by a `seed` tensor of shape [2]
(int32 or int64). Sub-seeds are derived with `tf.random.experimental.stateless_split`,
so a view is a pure function of (image, seed). The data pipeline builds the seed from
(global seed, epoch, example index), which is what lets training resume bit-exactly after
a crash. Keras random preprocessing layers are deliberately not used: they hold hidden RNG
state, and on a batch `RandomCrop` uses one crop for every image.

All functions work on ONE image [H, W, C] (before batching), eagerly and inside a
`tf.data` map, and the recipes return a static shape [S, S, 3]. The cropping recipes also
take the encoded file (a tf.string scalar): a JPEG then decodes only the crop window.

The colour recipes (moco_v2, cifar) have a two-stage form for the input pipeline
(`batch_views.two_stage`): per image the crop and the draws, per batch the colour ops.
"""

import math

import tensorflow as tf

from invp_tf import kernels


def _split(seed, num):
    """Returns `num` independent seeds [num, 2] derived from `seed` [2]."""
    return tf.random.experimental.stateless_split(seed, num=num)


def to_float_rgb(image):
    """Converts an image to float32 RGB in [0, 1].

    Args:
      image: [H, W, C] (or [H, W]) uint8 in [0, 255] or float in [0, 1], C in {1, 3}.

    Returns:
      float32 [H, W, 3] in [0, 1]; grey images are tiled to 3 channels.
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[:, :, None]
    # uint8 -> /255; float -> plain cast (assumed already in [0, 1]).
    image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels is None:
        # Unknown channel count (e.g. after decode without `channels=`): decide at run time.
        image = tf.cond(
            tf.equal(tf.shape(image)[-1], 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image
        )
    return tf.ensure_shape(image, [None, None, 3])


def random_resized_crop(image, seed, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crops a random area/aspect-ratio box and resizes it (torchvision RandomResizedCrop).

    The box is sampled by `stateless_sample_distorted_bounding_box` with `area_range=scale`
    and `aspect_ratio_range=ratio` (width / height); after 10 failed attempts the whole image
    is used. Cropping happens on the native dtype, before the float conversion.

    Args:
      image: [H, W, C] uint8 or float image, C in {1, 3}; or the encoded image file
        (JPEG, PNG, GIF, BMP; tf.string scalar), see `_random_resized_crop_encoded`.
      seed: int32/int64 [2] stateless seed.
      size: output side S (Python int).
      scale: (min, max) fraction of the image area covered by the crop.
      ratio: (min, max) aspect ratio width / height of the crop.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.string:
        return _random_resized_crop_encoded(image, seed, size, scale, ratio)
    if image.shape.rank == 2:
        image = image[:, :, None]
    begin, box_size = _crop_box(tf.shape(image), seed, scale, ratio)
    crop = tf.slice(image, begin, box_size)
    # The dynamic slice loses the channel count; later ops (grayscale, conv) need it.
    crop = tf.ensure_shape(crop, [None, None, image.shape[-1]])
    crop = tf.image.convert_image_dtype(crop, tf.float32)
    # Resized before a grey crop is tiled to RGB: the same values for a third of the work
    # (the resize treats channels independently), which matters when 28 px grey images are
    # upsampled on the CPU cores that also run the train step.
    crop = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    crop = to_float_rgb(tf.clip_by_value(crop, 0.0, 1.0))
    return tf.ensure_shape(crop, [size, size, 3])


def _crop_box(shape, seed, scale, ratio):
    """(begin [3], size [3]) of the random crop of an image of `shape` [H, W, C]."""
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, box_size


def _random_resized_crop_encoded(encoded, seed, size, scale, ratio):
    """`random_resized_crop` of an encoded file: the same box, and for a JPEG only the crop
    window is decoded (`decode_and_crop_jpeg`: the pixels of decode-then-crop).

    The box depends only on the image's height and width, which a JPEG's header gives
    (`extract_jpeg_shape`); other formats are decoded whole, then cropped. A crop smaller
    than S on both sides is upsampled without the antialias kernel (which changes nothing
    there but round-off, about 2e-6, at a quarter of the cost); a larger one keeps it. Where
    the native kernels build, InvpResizeAntialiased resizes the uint8 crop: the same to 3e-7.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, box_size = _crop_box(tf.stack([shape[0], shape[1], 3]), seed, scale, ratio)
        window = tf.stack([begin[0], begin[1], box_size[0], box_size[1]])
        return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        begin, box_size = _crop_box(tf.shape(image), seed, scale, ratio)
        return tf.slice(image, begin, box_size)

    crop = tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])
    if kernels.native_ops() is not None:
        crop = kernels.native_ops().invp_resize_antialiased(crop, [size, size])
    else:
        crop = tf.image.convert_image_dtype(crop, tf.float32)
        small = tf.reduce_all(tf.shape(crop)[:2] <= size)
        crop = tf.cond(
            small,
            lambda: tf.image.resize(crop, [size, size], method="bilinear"),
            lambda: tf.image.resize(crop, [size, size], method="bilinear", antialias=True),
        )
    return tf.ensure_shape(tf.clip_by_value(crop, 0.0, 1.0), [size, size, 3])


def random_flip(image, seed):
    """Flips left-right with probability 1/2.

    Args:
      image: [H, W, C] image.
      seed: int32/int64 [2] stateless seed.

    Returns:
      The image or its mirror, same shape and dtype.
    """
    return tf.image.stateless_random_flip_left_right(image, seed)


def random_apply(fn, image, seed, p):
    """Applies `fn(image, seed)` with probability `p`.

    Args:
      fn: callable (image, seed) -> image of the same shape and dtype.
      image: [H, W, C] image.
      seed: int32/int64 [2] stateless seed; split into a coin seed and a seed for `fn`.
      p: probability of applying `fn` (Python float).

    Returns:
      `fn(image, fn_seed)` or `image`.
    """
    coin_seed, fn_seed = tf.unstack(_split(seed, 2))
    if p >= 1.0:
        return fn(image, fn_seed)
    if p <= 0.0:
        return image
    apply = tf.random.stateless_uniform([], coin_seed) < p
    return tf.cond(apply, lambda: fn(image, fn_seed), lambda: image)


def _grayscale(image):
    # [H, W, 3] -> [H, W, 3] with equal channels (ITU-R 601 luma, as torchvision).
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def random_grayscale(image, seed, p):
    """Converts to 3-channel grayscale with probability `p`.

    Args:
      image: float32 [H, W, 3] in [0, 1].
      seed: int32/int64 [2] stateless seed.
      p: probability of the conversion.

    Returns:
      float32 [H, W, 3].
    """
    return random_apply(lambda x, _: _grayscale(x), image, seed, p)


def _blend(image, other, factor):
    # torchvision's _blend: factor * image + (1 - factor) * other, clamped.
    return tf.clip_by_value(other + factor * (image - other), 0.0, 1.0)


def color_jitter(image, seed, brightness, contrast, saturation, hue):
    """Randomly jitters brightness, contrast, saturation and hue (torchvision ColorJitter).

    As torchvision, the four adjustments are applied in a RANDOM order (a stateless
    permutation of the four), with factors uniform in [max(0, 1 - s), 1 + s] for
    brightness/contrast/saturation and a hue shift uniform in [-hue, hue] (fraction of the
    colour wheel). Brightness multiplies, contrast blends with the mean grey level,
    saturation blends with the grey image. The result is clipped to [0, 1] after each step.

    Args:
      image: float32 [H, W, 3] in [0, 1].
      seed: int32/int64 [2] stateless seed.
      brightness: strength s >= 0 (0 disables).
      contrast: strength s >= 0 (0 disables).
      saturation: strength s >= 0 (0 disables).
      hue: strength in [0, 0.5] (0 disables).

    Returns:
      float32 [H, W, 3] in [0, 1].
    """
    seeds = _split(seed, 5)  # [5, 2]: one for the order, one per adjustment.

    def factor(strength, s):
        return tf.random.stateless_uniform([], s, max(0.0, 1.0 - strength), 1.0 + strength)

    def adjust_brightness(x):
        return x if not brightness else tf.clip_by_value(x * factor(brightness, seeds[1]), 0, 1)

    def adjust_contrast(x):
        if not contrast:
            return x
        mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x))
        return _blend(x, mean, factor(contrast, seeds[2]))

    def adjust_saturation(x):
        if not saturation:
            return x
        return _blend(x, _grayscale(x), factor(saturation, seeds[3]))

    def adjust_hue(x):
        if not hue:
            return x
        delta = tf.random.stateless_uniform([], seeds[4], -hue, hue)
        return tf.clip_by_value(tf.image.adjust_hue(x, delta), 0.0, 1.0)

    branches = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    order = tf.argsort(tf.random.stateless_uniform([4], seeds[0]))  # a random permutation
    for step in range(4):
        image = tf.switch_case(order[step], [lambda f=f, x=image: f(x) for f in branches])
        image = tf.ensure_shape(image, [None, None, 3])
    return image


def gaussian_blur(image, seed, sigma=(0.1, 2.0)):
    """Blurs with a Gaussian of random sigma (separable depthwise convolution).

    The kernel side is about 10% of the shorter image side, made odd (as SimCLR); borders are
    reflect-padded so a constant image stays constant.

    Args:
      image: float32 [H, W, 3].
      seed: int32/int64 [2] stateless seed.
      sigma: (min, max) range of the standard deviation in pixels.

    Returns:
      float32 [H, W, 3].
    """
    sig = tf.random.stateless_uniform([], seed, sigma[0], sigma[1])
    shape = tf.shape(image)
    radius = tf.minimum(shape[0], shape[1]) // 20  # kernel side 2 * radius + 1 ~ 10%
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sig))
    kernel /= tf.reduce_sum(kernel)  # [K]
    kernel = tf.tile(kernel[:, None, None, None], [1, 1, 3, 1])  # [K, 1, 3, 1]
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    out = padded[None]  # [1, H + 2r, W + 2r, 3]
    out = tf.nn.depthwise_conv2d(out, kernel, [1, 1, 1, 1], "VALID")  # along H
    out = tf.nn.depthwise_conv2d(out, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
    return tf.ensure_shape(out[0], image.shape)


def cifar_view(image, seed, image_size):
    """The authors' CIFAR view: crop (0.2-1), grayscale p=0.2, jitter 0.4 x4, flip.

    A recipe of RECIPES: image [H, W, C] (C in {1, 3}), seed [2] -> float32 [S, S, 3].
    """
    seeds = _split(seed, 4)
    x = random_resized_crop(image, seeds[0], image_size, scale=(0.2, 1.0))
    x = random_grayscale(x, seeds[1], p=0.2)
    x = color_jitter(x, seeds[2], 0.4, 0.4, 0.4, 0.4)
    x = random_flip(x, seeds[3])
    return tf.ensure_shape(x, [image_size, image_size, 3])


def moco_v2_view(image, seed, image_size):
    """The MoCo v2 view: crop (0.2-1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
    Gaussian blur (sigma 0.1-2) p=0.5, flip.

    A recipe of RECIPES: image [H, W, C] (C in {1, 3}), seed [2] -> float32 [S, S, 3].
    """
    seeds = _split(seed, 5)
    x = random_resized_crop(image, seeds[0], image_size, scale=(0.2, 1.0))
    x = random_apply(lambda y, s: color_jitter(y, s, 0.4, 0.4, 0.4, 0.1), x, seeds[1], p=0.8)
    x = random_grayscale(x, seeds[2], p=0.2)
    x = random_apply(gaussian_blur, x, seeds[3], p=0.5)
    x = random_flip(x, seeds[4])
    return tf.ensure_shape(x, [image_size, image_size, 3])


def crop_flip_view(image, seed, image_size, scale=(0.2, 1.0)):
    """Random resized crop and flip only, for grey data where colour jitter is meaningless.

    Args:
      image: [H, W, C] uint8 or float image, C in {1, 3}.
      seed: int32/int64 [2] stateless seed.
      image_size: output side S.
      scale: (min, max) crop area fraction; set with `functools.partial(crop_flip_view,
        scale=...)`.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    seeds = _split(seed, 2)
    x = random_resized_crop(image, seeds[0], image_size, scale=scale)
    x = random_flip(x, seeds[1])
    return tf.ensure_shape(x, [image_size, image_size, 3])


def resize_view(image, seed, image_size):
    """No augmentation: resize to [S, S]; `seed` is ignored (recipe signature).

    Args:
      image: [H, W, C] uint8 or float image, C in {1, 3}.
      seed: ignored.
      image_size: output side S.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    del seed
    x = tf.image.resize(to_float_rgb(image), [image_size, image_size], antialias=True)
    return tf.ensure_shape(tf.clip_by_value(x, 0.0, 1.0), [image_size, image_size, 3])


def eval_view(image, image_size):
    """Deterministic evaluation view.

    If the shorter side is > 1.15 * S (ImageNet-sized images), resize the shorter side to
    S / 0.875 and take the central S x S crop (the standard ImageNet protocol); otherwise
    (CIFAR, Fashion-MNIST, ...) just resize to S x S.

    Args:
      image: [H, W, C] uint8 or float image, C in {1, 3}.
      image_size: output side S.

    Returns:
      float32 [S, S, 3] in [0, 1].
    """
    image = to_float_rgb(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.reduce_min(shape)

    def resize_center_crop():
        target = math.ceil(image_size / 0.875)
        new_hw = tf.cast(tf.math.ceil(shape * target / short), tf.int32)  # short side = target
        big = tf.image.resize(image, new_hw, antialias=True)
        top = (new_hw[0] - image_size) // 2
        left = (new_hw[1] - image_size) // 2
        return tf.slice(big, [top, left, 0], [image_size, image_size, 3])

    def resize():
        return tf.image.resize(image, [image_size, image_size], antialias=True)

    x = tf.cond(short > 1.15 * image_size, resize_center_crop, resize)
    return tf.ensure_shape(tf.clip_by_value(x, 0.0, 1.0), [image_size, image_size, 3])


# ---------------------------------------------------------------------------- two stages
#
# The colour recipes as (per image: crop and draws) + (per batch: colour ops). Every draw is
# the one the per-image recipe makes from the same seed, so the two forms give the same view.


# Name -> fn(image, seed, image_size); the trainer picks one by flag. Every recipe takes
# image: [H, W, C] uint8 or float, C in {1, 3}; seed: int32/int64 [2] stateless seed;
# image_size: the output side S; and returns float32 [S, S, 3] in [0, 1].
RECIPES = {
    "cifar": cifar_view,
    "moco_v2": moco_v2_view,
    "crop_flip": crop_flip_view,
    "none": resize_view,
}


def get_view(name):
    """Looks up a view recipe by name.

    Args:
      name: a key of `RECIPES`.

    Returns:
      fn(image, seed, image_size) -> float32 [image_size, image_size, 3] in [0, 1].
    """
    if name not in RECIPES:
        raise ValueError(f"unknown view {name!r}; valid views: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


# Recipes whose first step is random_resized_crop, which takes an encoded file.
_ENCODED = (cifar_view, moco_v2_view, crop_flip_view)


def takes_encoded(view):
    """Whether `view` (a recipe, or a functools.partial of one) takes an encoded file."""
    return getattr(view, "func", view) in _ENCODED
