"""The SavedModel of a trained encoder: one export for TF Serving, TF-Hub and Keras 3.

`export_run(workdir, export_dir, model_name)` writes `EXPORT_DIR/MODEL_NAME/<version>/` (the
next free version unless `version` is given) holding:
  - signature `serving_default`: images float32 [None, S, S, 3] in [0, 1]
    -> {"embedding": [None, D] L2-normalised, "features": [None, F] pooled backbone,
    "projection": [None, D] the head's output before the L2 normalisation};
  - signature `serving_bytes`: image_bytes string [None] (encoded JPEG/PNG/GIF/BMP)
    -> the same outputs, after the training-time `augment.eval_view` resize/crop; an image
    above --max_image_pixels (width x height, read from its header) fails before decoding;
  - both signatures take an empty batch and return empty outputs ([0, D], [0, F]);
  - the TF-Hub reusable SavedModel API: `__call__(images, training)` -> features [None, F], one
    tensor (TF-Hub's image feature-vector convention; `return_dict=True` gives both outputs),
    traced for training True and False, so BatchNorm trains under
    `hub.KerasLayer(trainable=True)`; `variables`,
    `trainable_variables`, `regularization_losses`; and `serve` (images -> outputs), the
    default endpoint of `keras.layers.TFSMLayer`; `stage_outputs` (images -> every stage's
    feature map);
  - assets/invp_export.json (image_size, dims, normalisation, source run and checkpoint,
    max_image_pixels, the import's origin), assets/flags.txt (the recipe), the model card
    (`model_card`: README.md, assets/MODEL_CARD.md, Kaggle's model-metadata.json) and, for a run
    imported from PyTorch, assets/imported.json.

The traps this module avoids (measured on TF 2.20): Keras 3 `model.export()` has no callable
object, so hub cannot fine-tune it; lists of Keras `Variable`s load in Python but break the
TF1 session loader of `saved_model_cli` and TF Serving, so the lists hold the backing
`tf.Variable`s. The export is checked through that TF1 loader before it is published, and it is
published atomically (written beside the target, then renamed), so TF Serving, which polls the
base folder for numeric version folders, never sees half an export.
"""

import json
import os
import re
import uuid

import numpy as np
import tensorflow as tf

from invp_tf import augment
from invp_tf import model_card
from invp_tf import pretrained
from invp_tf import workdir as workdir_lib

SIGNATURES = ("serving_default", "serving_bytes")
METADATA_FILE = "invp_export.json"
# Accepted pixel range of `images`: [0, 1] widened for the overshoot of bicubic/Lanczos resizing
# in a client's own preprocessing, narrow enough to reject 0..255 pixels and mean/std-normalised
# images (both silently give wrong embeddings; REST clients cannot send a dtype to catch them).
PIXEL_RANGE = (-0.1, 1.1)
# File signatures tf.io.decode_image reads (JPEG, PNG, GIF, BMP).
_IMAGE_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
# Default largest image `serving_bytes` decodes (width x height, read from the file header
# before decoding): 50 megapixels, 150 MB as RGB. A small file can hold a huge image (a
# 291 KB PNG of 10000x10000 took 1.3 GB to decode); --max_image_pixels sets it per export.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Largest difference allowed between the reloaded export and the in-memory encoder, relative to
# the largest output value: kernel-order round-off is ~1e-5; a wrong variable or view is ~1.
_VERIFY_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The export could not be written or did not reproduce the encoder; nothing was published."""


def check_images(images, image_size):
    """Checks a batch of images at run time; the error names what is wrong.

    The signature declares `images` with unknown rank on purpose: a declared [None, S, S, 3]
    would let the graph optimiser fold these checks away, and TF Serving does not check feed
    shapes itself (a 13x13 batch would silently embed). The dtype is enforced by the signature.

    Args:
      images: float32 tensor of any shape.
      image_size: S.

    Returns:
      `images` with static shape [None, S, S, 3], after the checks.
    """
    # The checks run in parallel, so none may fail on a wrong rank itself: the shape is padded
    # to 4 entries and the size and channel checks only fire for rank 4.
    rank, shape = tf.rank(images), tf.shape(images)
    is_rank4 = tf.equal(rank, 4)
    padded = tf.concat([shape, [-1, -1, -1, -1]], axis=0)  # [batch, height, width, channels,..]
    height, width, channels = padded[1], padded[2], padded[3]
    pixels = tf.reshape(images, [-1])
    lowest = tf.reduce_min(tf.concat([pixels, [0.0]], axis=0))  # empty batches pass
    highest = tf.reduce_max(tf.concat([pixels, [0.0]], axis=0))
    checks = [
        tf.debugging.Assert(
            is_rank4,
            ["images must have rank 4 [batch, height, width, 3]; got shape", shape],
            summarize=8,
        ),
        tf.debugging.Assert(
            tf.logical_or(
                tf.logical_not(is_rank4),
                tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size)),
            ),
            [f"images must have size {image_size}x{image_size} (height x width); got shape", shape],
            summarize=8,
        ),
        tf.debugging.Assert(
            tf.logical_or(tf.logical_not(is_rank4), tf.equal(channels, 3)),
            ["images must have 3 channels (RGB); got shape", shape],
            summarize=8,
        ),
        tf.debugging.Assert(
            tf.logical_and(lowest >= PIXEL_RANGE[0], highest <= PIXEL_RANGE[1]),
            [
                "images must be float32 in [0, 1] (divide uint8 pixels by 255); got min",
                lowest,
                "max",
                highest,
            ],
        ),
    ]
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    # Not tf.ensure_shape: Grappler unifies its input and output shapes and then folds the
    # checks above to "rank 4" before they run. Reshape (a no-op on valid input) states the
    # static shape without asserting anything about its input.
    return tf.reshape(images, [-1, image_size, image_size, 3])


def _header_pixels(data):
    """width * height (int64) of an encoded image, read from its header without decoding."""
    head = tf.strings.substr(data, 0, 32) + b"\0" * 32  # short files: zeros, not errors
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(head, 0, 32), tf.uint8), tf.int64)

    def number(offset, size, big_endian):
        digits = [raw[offset + i] for i in range(size)]
        if not big_endian:
            digits.reverse()
        value = tf.constant(0, tf.int64)
        for digit in digits:
            value = value * 256 + digit
        return value

    def signed32(value):  # BMP stores a negative height for top-down rows
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    png = lambda: number(16, 4, True) * number(20, 4, True)  # noqa: E731 (IHDR)
    gif = lambda: number(6, 2, False) * number(8, 2, False)  # noqa: E731 (logical screen)
    bmp = lambda: signed32(number(18, 4, False)) * signed32(number(22, 4, False))  # noqa: E731
    prefix = lambda magic: tf.strings.substr(data, 0, len(magic)) == magic  # noqa: E731
    return tf.case(
        [
            (prefix(_IMAGE_MAGICS[0]), jpeg),
            (prefix(_IMAGE_MAGICS[1]), png),
            (tf.logical_or(prefix(_IMAGE_MAGICS[2]), prefix(_IMAGE_MAGICS[3])), gif),
            (prefix(_IMAGE_MAGICS[4]), bmp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )


def decode_images(image_bytes, image_size, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Encoded images -> the evaluation view of training, [B, S, S, 3] float32 in [0, 1].

    Each element is decoded with `tf.io.decode_image` (first frame of a GIF, grey and RGBA
    converted to RGB), then resized/cropped by `augment.eval_view`, exactly as the eval pipeline
    does for image folders. An image above `max_pixels` (width x height from its header) fails
    before it is decoded.

    Args:
      image_bytes: string [B], encoded JPEG, PNG, GIF or BMP images.
      image_size: S.
      max_pixels: the largest width x height decoded.

    Returns:
      float32 [B, S, S, 3].
    """

    def decode_one(i):
        data = image_bytes[i]
        is_image = tf.reduce_any(
            [tf.strings.substr(data, 0, len(m)) == m for m in _IMAGE_MAGICS], axis=0
        )
        message = tf.strings.format(
            "image_bytes[{}] is not an encoded JPEG, PNG, GIF or BMP image; it starts with {}",
            (i, tf.strings.substr(data, 0, 8)),
        )
        checked = tf.debugging.Assert(is_image, [message])
        with tf.control_dependencies([checked]):
            pixels = _header_pixels(data)
        too_large = tf.strings.format(
            "image_bytes[{}] has {} pixels (width x height), above the limit of "
            f"{int(max_pixels)} of this export (--max_image_pixels of invp_tf.export)",
            (i, pixels),
        )
        small = tf.debugging.Assert(pixels <= max_pixels, [too_large])
        with tf.control_dependencies([small]):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return augment.eval_view(tf.ensure_shape(image, [None, None, 3]), image_size)

    indices = tf.range(tf.shape(image_bytes)[0])
    return tf.map_fn(
        decode_one,
        indices,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )


def _regularization_loss(kernels, l2):
    # A zero-argument tf.function, the form hub.KerasLayer adds to the model's losses.
    return tf.function(
        lambda: l2 * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels]), input_signature=[]
    )


class _Untracked:
    """Holds the Keras encoder out of the saved object graph: only its variables are saved."""

    def __init__(self, encoder):
        self.encoder = encoder


class EncoderModule(tf.Module):
    """What the SavedModel root is: the TF-Hub reusable SavedModel API plus serving functions.

    Args:
      encoder: a built `encoder.Encoder`.
      image_size: S, the side of the images it was trained on.
      l2_regularization: coefficient of the exported L2 penalty on conv/dense kernels
        (`regularization_losses`; none when 0).
      metadata_path: optional JSON file saved as the asset `invp_export.json`.
      flags_path: optional flags.txt of the run, saved as the asset `flags.txt`.
      max_image_pixels: largest width x height `serving_bytes` decodes.
      card_path: optional model card, saved as the asset `MODEL_CARD.md`.
      origin_path: optional imported.json of a run imported from PyTorch (asset).
    """

    # tf.Module defines these as read-only properties that collect every variable reachable
    # from the object; the hub API wants explicit lists, so class attributes shadow them.
    variables = None
    trainable_variables = None

    def __init__(
        self,
        encoder,
        image_size,
        l2_regularization=0.0,
        metadata_path=None,
        flags_path=None,
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
        card_path=None,
        origin_path=None,
    ):
        super().__init__(name="invp_encoder")
        self._held = _Untracked(encoder)
        self._image_size = int(image_size)
        self._max_image_pixels = int(max_image_pixels)
        # The backing tf.Variables, not the Keras Variables (see the module docstring).
        self.variables = [v.value for v in encoder.variables]
        self.trainable_variables = [v.value for v in encoder.trainable_variables]
        kernels = [v.value for v in encoder.trainable_variables if v.name == "kernel"]
        self.regularization_losses = (
            [_regularization_loss(kernels, float(l2_regularization))] if l2_regularization else []
        )
        if metadata_path:
            self.metadata = tf.saved_model.Asset(metadata_path)
        if flags_path:
            self.flags = tf.saved_model.Asset(flags_path)
        if card_path:
            self.model_card = tf.saved_model.Asset(card_path)
        if origin_path:
            self.origin = tf.saved_model.Asset(origin_path)

    def _outputs(self, images, training):
        images = check_images(images, self._image_size)
        outputs = self._held.encoder(images, training=training)
        return {"embedding": outputs["embedding"], "features": outputs["features"]}

    @tf.function
    def __call__(self, images, training=False, return_dict=False):
        """TF-Hub API: images [B, S, S, 3] in [0, 1] -> features [B, F] (pooled backbone).

        One tensor by default, TF-Hub's image feature-vector convention, so that
        `hub.KerasLayer(path, trainable=True)` is one layer of a Sequential model. The pooled
        backbone, not the embedding: the projection head is trained to discard what the
        augmentations change, the backbone output keeps more of what transfer tasks need (the
        usual choice for contrastive encoders, and what a classifier head is put on).
        `return_dict=True` gives {"embedding", "features"} (hub: `arguments=dict(return_dict=True),
        output_key="embedding"`).

        Traced for training=True (BatchNorm uses batch statistics and updates its moving
        averages) and training=False, each with return_dict False and True.
        """
        outputs = self._outputs(images, training)
        return outputs if return_dict else outputs["features"]

    def _serving_outputs(self, images):
        # An empty batch gives empty outputs: the encoder itself fails on zero images.
        images = check_images(images, self._image_size)
        encoder = self._held.encoder
        empty = {
            "embedding": tf.zeros([0, encoder.embedding_dim]),
            "features": tf.zeros([0, encoder.feature_dim]),
            "projection": tf.zeros([0, encoder.embedding_dim]),
        }

        def encode():
            outputs = encoder(images, training=False)
            # The head again on the pooled features (inference: no state changes), for the
            # output before the L2 normalisation.
            projection = tf.cast(encoder.head(outputs["features"], training=False), tf.float32)
            return {
                "embedding": outputs["embedding"],
                "features": outputs["features"],
                "projection": projection,
            }

        return tf.cond(tf.shape(images)[0] > 0, encode, lambda: empty)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def serve(self, images):
        """images float32 [B, S, S, 3] in [0, 1] -> {"embedding", "features"}, inference.

        B may be 0: the outputs are then [0, D] and [0, F].
        """
        return self._serving_outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        """image_bytes string [B] of encoded images -> {"embedding", "features"}, inference.

        Images above the export's --max_image_pixels fail before decoding; B may be 0.
        """
        images = decode_images(image_bytes, self._image_size, self._max_image_pixels)
        return self._serving_outputs(images)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def stage_outputs(self, images):
        """images float32 [B, S, S, 3] in [0, 1] -> {"stem", "stage1".."stage4"}: the feature
        maps [B, h, w, C] of every stage, inference (a function of the loaded object, not a
        serving signature: dense prediction, per-block probes, checks against other ports)."""
        images = check_images(images, self._image_size)
        outputs = self._held.encoder.stage_outputs(images, training=False)
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}


def save(module, path):
    """Writes `module` as a SavedModel at `path` with both signatures and every __call__ trace."""
    spec = tf.TensorSpec(None, tf.float32, name="images")
    for training in (True, False):
        for return_dict in (False, True):
            module.__call__.get_concrete_function(spec, training=training, return_dict=return_dict)
    signatures = {"serving_default": module.serve, "serving_bytes": module.serve_bytes}
    tf.saved_model.save(module, path, signatures=signatures)


def run_signatures_tf1(path, feeds):
    """Runs signatures through the TF1 session loader, the loader of saved_model_cli and
    TF Serving (which fails on exports that load fine in TF2).

    Args:
      path: SavedModel folder.
      feeds: {signature name: {input name: numpy array}}.

    Returns:
      {signature name: {output name: numpy array}}.
    """
    results = {}
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        for name, inputs in feeds.items():
            signature = meta_graph.signature_def[name]
            fetches = {key: info.name for key, info in signature.outputs.items()}
            feed_dict = {signature.inputs[key].name: value for key, value in inputs.items()}
            results[name] = session.run(fetches, feed_dict)
    return results


def verify(path, encoder, image_size, seed=0):
    """Checks the SavedModel at `path` against the in-memory encoder, through the TF1 loader.

    Raises:
      ExportError: a signature is missing or its outputs differ from the encoder's.
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(2, image_size, image_size, 3)).astype(np.float32)
    # A non-square image exercises the resize (and, when large, the centre crop) of eval_view.
    pixels = rng.integers(0, 256, size=(image_size + 7, 2 * image_size + 3, 3), dtype=np.uint8)
    png = tf.io.encode_png(pixels).numpy()
    expected = {
        "serving_default": dict(encoder(images, training=False)),
        "serving_bytes": dict(encoder(augment.eval_view(pixels, image_size)[None], training=False)),
    }
    for outputs in expected.values():
        outputs["projection"] = encoder.head(outputs["features"], training=False)
    feeds = {
        "serving_default": {"images": images},
        "serving_bytes": {"image_bytes": np.array([png], dtype=object)},
    }
    try:
        results = run_signatures_tf1(path, feeds)
    except (KeyError, tf.errors.OpError) as e:
        detail = " ".join(str(e).split())[:500]  # one line for the CLI's error message
        raise ExportError(
            f"the export does not run in the TF1 (TF Serving) loader: {detail}"
        ) from e
    for name, outputs in expected.items():
        for key in ("embedding", "features", "projection"):
            want = np.asarray(outputs[key], np.float32)
            diff = float(np.max(np.abs(results[name][key] - want)) / max(1, np.max(np.abs(want))))
            if not diff <= _VERIFY_TOLERANCE:
                raise ExportError(f"{name}/{key} differs from the encoder by {diff:.3g} (relative)")


def next_version(model_dir):
    """1 + the largest numeric version folder in `model_dir` (1 when there is none)."""
    if not tf.io.gfile.isdir(model_dir):
        return 1
    # Object stores list folders with a trailing slash ("1/").
    names = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir)]
    versions = [int(name) for name in names if re.fullmatch(r"\d+", name)]
    return max(versions, default=0) + 1


def _write_metadata(path, run, workdir, l2_regularization, max_image_pixels):
    # What a consumer needs without reading the graph (invp_tf.embed reads image_size and dims).
    config = run.config
    metadata = {
        "image_size": config.image_size,
        "embedding_dim": config.embedding_dim,
        "feature_dim": run.encoder.feature_dim,
        "encoder": config.encoder,
        "head": config.head,
        "width_multiplier": config.width_multiplier,
        "stem_width": config.stem_width,
        "head_hidden_dim": config.head_hidden_dim,
        "normalization": config.normalization,
        "epoch": run.epoch,
        "workdir": workdir if "://" in workdir else os.path.abspath(workdir),
        "l2_regularization": l2_regularization,
        "max_image_pixels": max_image_pixels,
        "checkpoint": os.path.basename(run.checkpoint),
        "signatures": list(SIGNATURES),
    }
    record = pretrained.read_record(workdir)
    if record is not None:
        metadata["origin"] = {key: record[key] for key in ("file", "sha256", "format", "epoch")}
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata, record


def _publish(source, target):
    """Moves the folder `source` to `target`, which must not exist.

    One rename on a local file system: atomic, all or nothing. Other file systems (gs://, s3://,
    ram://) have no folder rename: the files move one by one, saved_model.pb last, so a server
    polling the base folder finds either no loadable version or a whole one.
    """
    if "://" not in target:
        tf.io.gfile.rename(source, target)
        return
    tf.io.gfile.makedirs(target)
    files = []
    for folder, _, names in tf.io.gfile.walk(source):
        relative = os.path.relpath(folder, source) if folder != source else ""
        tf.io.gfile.makedirs(os.path.join(target, relative))
        files += [os.path.join(relative, name) for name in names]
    files.sort(key=lambda name: name in ("saved_model.pb", "saved_model.pbtxt"))
    for name in files:
        tf.io.gfile.rename(os.path.join(source, name), os.path.join(target, name))


def export_run(
    workdir,
    export_dir,
    model_name,
    version=0,
    l2_regularization=None,
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    checkpoint=None,
):
    """Exports the latest checkpoint of a training run to `export_dir/model_name/version/`.

    Args:
      workdir: the run's work directory (flags.txt and checkpoints/).
      export_dir: base folder of TF Serving (holds one folder per model name).
      model_name: folder name of the model under `export_dir`.
      version: positive integer version; 0 picks the next free one.
      l2_regularization: coefficient of the exported L2 kernel penalty; None: half the run's
        --weight_decay (the pull SGD's decoupled weight decay had in training).
      max_image_pixels: largest width x height `serving_bytes` decodes (in the metadata).
      checkpoint: the checkpoint to export ("ckpt-2" or a path); None: the newest readable one
        (a corrupt newest one is skipped with a warning). It must match the run's flags.txt.

    Returns:
      The path of the version folder written.

    Raises:
      FileNotFoundError: `workdir` is not a run or has no checkpoint.
      ValueError: bad model name or version, or the version folder exists.
      ExportError: the written SavedModel failed its check (nothing is published).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name or ""):
        raise ValueError(
            f"--model_name={model_name!r} must be a folder name (letters, digits, _ . -)"
        )
    if version < 0:
        raise ValueError(f"--version={version} must be a positive integer (0 = next free)")
    if max_image_pixels < 1:
        raise ValueError(f"--max_image_pixels={max_image_pixels} must be >= 1")
    run = workdir_lib.load_run(workdir, checkpoint=checkpoint)
    model_dir = os.path.join(export_dir, model_name)
    version = version or next_version(model_dir)
    target = os.path.join(model_dir, str(version))
    if tf.io.gfile.exists(target):
        raise ValueError(f"{target} already exists; pick another --version or omit it")
    config = run.config
    if l2_regularization is None:
        l2_regularization = config.weight_decay / 2
    if l2_regularization < 0:
        raise ValueError(f"--l2_regularization={l2_regularization} must be >= 0")
    # Every path goes through tf.io.gfile: export_dir may be gs://, s3://, hdfs://, ram://.
    tf.io.gfile.makedirs(model_dir)
    # A dot-folder beside the target: not a numeric version, so TF Serving ignores it.
    staging = os.path.join(model_dir, f".{version}.tmp-{uuid.uuid4().hex[:12]}")
    tf.io.gfile.makedirs(staging)
    try:
        metadata_path = os.path.join(staging, METADATA_FILE)
        metadata, record = _write_metadata(
            metadata_path, run, workdir, l2_regularization, max_image_pixels
        )
        card = model_card.text(metadata, record)
        card_path = os.path.join(staging, model_card.CARD_ASSET)
        with tf.io.gfile.GFile(card_path, "w") as f:
            f.write(card)
        module = EncoderModule(
            run.encoder,
            config.image_size,
            l2_regularization=l2_regularization,
            metadata_path=metadata_path,
            flags_path=os.path.join(workdir, "flags.txt"),
            max_image_pixels=max_image_pixels,
            card_path=card_path,
            origin_path=os.path.join(workdir, pretrained.IMPORT_FILE) if record else None,
        )
        saved = os.path.join(staging, "saved_model")
        save(module, saved)
        verify(saved, run.encoder, config.image_size)
        # Beside the SavedModel (loaders read only saved_model.pb, variables/ and assets/).
        with tf.io.gfile.GFile(os.path.join(saved, model_card.CARD_FILE), "w") as f:
            f.write(card)
        with tf.io.gfile.GFile(os.path.join(saved, model_card.KAGGLE_FILE), "w") as f:
            f.write(model_card.kaggle_metadata(metadata, model_name, card, record))
        try:
            _publish(saved, target)
        except tf.errors.OpError as e:  # another export took this version meanwhile
            raise ExportError(f"could not publish {target}: {e.message}") from e
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return target
