"""Input pipeline throughput per CPU-second: the pipeline training builds, against plain tf.data.

    python -m benchmarks.input_pipeline --flagfile=configs/r50.flags --dataset=folder:DIR \
        [--make_images=400] [--batch_size=32 --rounds=5 --batches=6]

Times exactly what `invp-train` reads for that recipe: `data.load_source` and
`invp_tf.input_pipeline.train_pipeline` with the recipe's view (`training.view_from_config`),
one epoch's pipeline after another. Each round builds a fresh pipeline (a new epoch), pulls
--warmup_batches, then counts the process CPU time (`time.process_time`: every thread of
the process, so a loaded machine still gives a fair figure) over --batches batches.

For folder datasets a plain tf.data reference is timed in the same rounds, alternated with
the project's pipeline: `extract_jpeg_shape` + `stateless_sample_distorted_bounding_box`
+ `decode_and_crop_jpeg`, a plain bilinear resize, flip, and for colour recipes tf.image's
own colour jitter (p=0.8), grayscale (p=0.2) and, for moco_v2, a Gaussian blur (p=0.5);
`num_parallel_calls=AUTOTUNE`, deterministic order, the same tf.data options as the
project's pipeline. Its speed ratio is reported per round and paired over the rounds.

--make_images=N first writes N ImageNet-like JPEGs (about 500x375, quality 90, smooth
random content) into the folder when it holds no image, so anyone can rerun it.

The last line is `images per CPU-second: X` (the project's pipeline).
"""

import itertools
import math
import os
import statistics
import sys
import time
from unittest import mock

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import data
from invp_tf import input_pipeline
from invp_tf import kernels
from invp_tf import train  # defines invp-train's flags (the Config's fields) in absl's FLAGS
from invp_tf import training

_MAKE = flags.DEFINE_integer(
    "make_images", 0, "Write this many ImageNet-like JPEGs into an empty --dataset folder."
)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; each times every pipeline once.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 2, "Batches pulled before timing, per round.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Timed batches per round and pipeline.")
_REFERENCE = flags.DEFINE_bool("reference", True, "Time the plain tf.data reference too.")
_PER_IMAGE = flags.DEFINE_bool(
    "per_image",
    False,
    "Also time the recipe applied per image to whole decoded images (the project's pipeline "
    "before crop-window decoding and the per-batch colour ops).",
)
_TF_OPS = flags.DEFINE_bool(
    "tf_ops",
    False,
    "Also time the project's pipeline with the native view kernels off (the TensorFlow-op "
    "resize and blur, as on a machine without a C++ compiler or with INVP_TF_NATIVE=0).",
)
_OUTPUT = flags.DEFINE_string("output", "", "Markdown file to append a row to (empty: none).")
_NOTE = flags.DEFINE_string("machine_note", "", "Added to the machine column.")


def write_jpeg_folder(folder, num_images, *, seed=0, num_classes=10, quality=90):
    """Writes `num_images` ImageNet-like JPEGs under `folder`/cCC/ (class subfolders).

    Sizes about 500x375 (landscape and some portrait, 400-500 by 300-375), smooth random
    colour fields with edges and fine noise, so the files are as large (about 60-120 KB)
    and decode as slowly as photographs of that size.

    Returns:
      The paths written, in order.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        w, h = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        if rng.random() < 0.2:
            w, h = h, w  # portrait
        coarse = rng.uniform(0, 255, (int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3))
        image = tf.image.resize(coarse[None].astype(np.float32), [h, w], method="bicubic")[0]
        image += rng.normal(0, 18, (h, w, 3)).astype(np.float32)  # texture
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image = image.numpy()
        image[y0 : y0 + h // 3, x0 : x0 + w // 3] += rng.uniform(-80, 80, 3)  # an object
        encoded = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=quality)
        path = os.path.join(folder, f"c{i % num_classes:02d}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, encoded)
        paths.append(path)
    return paths


def reference_pipeline(paths, *, batch_size, image_size, recipe, seed, epoch):
    """The plain tf.data pipeline: crop-window JPEG decode, plain resize, tf.image's ops.

    recipe: "moco_v2" (jitter 0.8, grayscale 0.2, blur 0.5, flip), "cifar" (as moco_v2
    without blur), anything else: crop and flip only.
    """
    colour = recipe in ("moco_v2", "cifar")
    blur = recipe == "moco_v2"
    base = tf.constant(seed * 1_000_003 + epoch, tf.int64)

    def view(path, index):
        seeds = tf.random.experimental.stateless_split(tf.stack([base, index]), 8)
        encoded = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seeds[0],
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.2, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        x = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        x = tf.image.resize(tf.cast(x, tf.float32) / 255.0, [image_size, image_size])
        x = tf.image.stateless_random_flip_left_right(x, seeds[1])
        if colour:

            def jitter(y):
                y = tf.image.stateless_random_brightness(y, 0.4, seeds[3])
                y = tf.image.stateless_random_contrast(y, 0.6, 1.4, seeds[4])
                y = tf.image.stateless_random_saturation(y, 0.6, 1.4, seeds[5])
                y = tf.image.stateless_random_hue(y, 0.1, seeds[6])
                return tf.clip_by_value(y, 0.0, 1.0)

            coins = tf.random.stateless_uniform([3], seeds[2])
            x = tf.cond(coins[0] < 0.8, lambda: jitter(x), lambda: x)
            x = tf.cond(
                coins[1] < 0.2, lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), lambda: x
            )
            if blur:
                x = tf.cond(coins[2] < 0.5, lambda: _reference_blur(x, seeds[7]), lambda: x)
        return tf.ensure_shape(x, [image_size, image_size, 3]), index

    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), tf.range(n, dtype=tf.int64)))
    ds = ds.shuffle(n, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return input_pipeline.pipeline_options(ds)


def _reference_blur(x, seed):
    # SimCLR's blur: separable Gaussian, kernel side about 10% of the image, SAME padding.
    sigma = tf.random.stateless_uniform([], seed, 0.1, 2.0)
    radius = x.shape[0] // 20
    t = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(t / sigma))
    kernel = tf.tile((kernel / tf.reduce_sum(kernel))[:, None, None, None], [1, 1, 3, 1])
    y = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "SAME")
    y = tf.nn.depthwise_conv2d(y, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME")
    return y[0]


def _epochs(make):
    """Batches of make(epoch) for epoch 0, 1, ...: one pipeline per epoch, as training."""
    for epoch in itertools.count():
        yield from make(epoch)


def _cpu_seconds(batches, warmup, timed):
    """Process CPU seconds over `timed` batches of the iterator, after `warmup` of them."""
    for _ in range(warmup):
        next(batches)
    start = time.process_time()
    for _ in range(timed):
        tf.nest.map_structure(lambda t: t.numpy(), next(batches))
    return time.process_time() - start


def measure(pipelines, *, rounds, warmup, batches, batch_size):
    """Alternates the pipelines over `rounds`; returns {name: [CPU seconds per round]}.

    pipelines: {name: fn(round) -> iterator of batches}; every round builds each anew.
    """
    seconds = {name: [] for name in pipelines}
    for r in range(rounds):
        for name, make in pipelines.items():
            seconds[name].append(_cpu_seconds(make(r), warmup, batches))
        line = ", ".join(f"{k} {batches * batch_size / s[-1]:.0f}" for k, s in seconds.items())
        print(f"round {r + 1}/{rounds}: images per CPU-second: {line}", flush=True)
    return seconds


def _flagfiles():
    """The --flagfile arguments of the command line, as given ("" when none)."""
    given = [arg for arg in sys.argv[1:] if arg.lstrip("-").startswith("flagfile=")]
    return "".join(f"{arg} " for arg in given)


def _none():
    return None


def main(argv):
    del argv
    config = train.config_from_flags()  # the flags of invp-train, parsed by app.run
    if config.dataset.startswith("folder:") and _MAKE.value:
        folder = config.dataset[len("folder:") :]
        if not (os.path.isdir(folder) and data.list_images(folder)):
            write_jpeg_folder(folder, _MAKE.value)
    source = data.load_source(
        config.dataset, "train", config.data_dir or None, config.train_examples
    )
    view = training.view_from_config(config)
    batch, size, warmup, timed = config.batch_size, config.image_size, _WARMUP.value, _BATCHES.value
    steps = source.num_examples // batch
    if steps < 1:
        raise app.UsageError(f"--batch_size={batch} exceeds the {source.num_examples} images")
    if warmup + timed > steps:
        # A round must stay inside one epoch: the next epoch's pipeline is built (and its
        # views traced) while the clock runs, which is not the pipeline's throughput.
        raise app.UsageError(
            f"--warmup_batches={warmup} + --batches={timed} exceed the {steps} batches of an "
            f"epoch ({source.num_examples} images at --batch_size={batch}); use more images "
            "(--make_images into a new folder) or fewer batches"
        )

    def rounds(make_epoch):
        """fn(round) -> that round's batches; round r starts at its own epoch, so rounds see
        different views (as epochs do). make_epoch(epoch) -> one epoch's pipeline."""
        return lambda r: _epochs(lambda e: make_epoch(r * math.ceil((warmup + timed) / steps) + e))

    def project_epoch(epoch, view=view, native=True):
        # The view's ops are chosen when the pipeline traces it, so the native kernels are
        # hidden during construction only.
        with mock.patch.object(kernels, "native_ops", kernels.native_ops if native else _none):
            return input_pipeline.train_pipeline(
                source,
                batch_size=batch,
                image_size=size,
                view=view,
                seed=config.seed,
                epoch=epoch,
            )

    project = rounds(project_epoch)
    pipelines = {"project": project}
    if _PER_IMAGE.value:

        def per_image_view(image, seed, image_size):  # neither encoded input nor two stages
            return view(image, seed, image_size)

        pipelines["per_image"] = rounds(lambda epoch: project_epoch(epoch, per_image_view))
    if _TF_OPS.value:
        pipelines["tf_ops"] = rounds(lambda epoch: project_epoch(epoch, native=False))
    if _REFERENCE.value and source.paths:
        pipelines["reference"] = rounds(
            lambda epoch: reference_pipeline(
                source.paths,
                batch_size=batch,
                image_size=size,
                recipe=config.augment,
                seed=config.seed,
                epoch=epoch,
            )
        )
    next(project(0))  # traces the view once before any timing
    seconds = measure(
        pipelines, rounds=_ROUNDS.value, warmup=warmup, batches=timed, batch_size=batch
    )
    images = timed * batch
    rate = {name: images * len(s) / sum(s) for name, s in seconds.items()}
    what = (
        f"--augment={config.augment}, {size} px, batch {batch}, {source.num_examples} images of "
        f"{config.dataset}; {_ROUNDS.value} rounds of {timed} batches after {warmup} warm-up"
    )
    result = f"project {rate['project']:.0f} images per CPU-second"
    if "reference" in rate:
        mean, low, high = report.paired_speed_ratio(seconds["project"], seconds["reference"])
        per_round = [r / p for r, p in zip(seconds["reference"], seconds["project"], strict=True)]
        interval = "" if low is None else f" (95% t-interval {low:.2f}-{high:.2f})"
        result += (
            f", plain tf.data reference {rate['reference']:.0f}: project / reference "
            f"{mean:.2f}{interval}, per round {', '.join(f'{x:.2f}' for x in per_round)}, "
            f"median {statistics.median(per_round):.2f}"
        )
    if "per_image" in rate:
        mean, low, high = report.paired_speed_ratio(seconds["project"], seconds["per_image"])
        interval = "" if low is None else f" (95% t-interval {low:.2f}-{high:.2f})"
        result += (
            f"; the recipe per image on whole decoded images {rate['per_image']:.0f}: project / "
            f"per image {mean:.2f}{interval}"
        )
    if "tf_ops" in rate:
        mean, low, high = report.paired_speed_ratio(seconds["project"], seconds["tf_ops"])
        interval = "" if low is None else f" (95% t-interval {low:.2f}-{high:.2f})"
        result += (
            f"; the same pipeline with TensorFlow-op views (native kernels off) "
            f"{rate['tf_ops']:.0f}: project / TensorFlow ops {mean:.2f}{interval}"
        )
    print(f"{what}\n{result}")
    if _OUTPUT.value:
        report.append_rows(
            _OUTPUT.value,
            [
                f"input pipeline | `python -m benchmarks.input_pipeline {_flagfiles()}"
                f"--dataset={config.dataset} --augment={config.augment} "
                f"--image_size={size} --batch_size={batch} --rounds={_ROUNDS.value} "
                f"--batches={timed}{' --per_image' if _PER_IMAGE.value else ''}"
                f"{' --tf_ops' if _TF_OPS.value else ''}` | "
                f"{report.machine()}"
                f"{', ' + _NOTE.value if _NOTE.value else ''}, load avg "
                f"{os.getloadavg()[0]:.1f} | {what}: {result} (process CPU time, alternated)"
            ],
        )
    print(f"images per CPU-second: {rate['project']:.1f}")


if __name__ == "__main__":
    app.run(main)
