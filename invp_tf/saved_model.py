"""The SavedModel of a trained encoder: one export for TF Serving, TF-Hub and Keras 3.

`export_run(workdir, export_dir, model_name)` writes `EXPORT_DIR/MODEL_NAME/<version>/` (the
next free version unless `version` is given) holding:
  - signature `serving_default`: images float32 [None, S, S, 3] in [0, 1]
    -> {"embedding": [None, D] L2-normalised, "features": [None, F] pooled backbone,
    "projection": [None, D] the head's output before the L2 normalisation};
  - signature `serving_bytes`: image_bytes string [None] (encoded JPEG/PNG/GIF/BMP)
    -> the same outputs, after the training-time `augment.eval_view` resize/crop; a request
    above the export's `image_headers.DecodeLimits` (batch size, bytes; per image frames and
    frames x width x height, read from the headers) fails before anything is decoded;
  - both signatures take an empty batch and return empty outputs ([0, D], [0, F]);
  - the TF-Hub reusable SavedModel API: `__call__(images, training)` -> features [None, F], one
    tensor (TF-Hub's image feature-vector convention; `return_dict=True` gives both outputs),
    traced for training True and False, so BatchNorm trains under
    `hub.KerasLayer(trainable=True)`; `variables`,
    `trainable_variables`, `regularization_losses`; and `serve` (images -> outputs), the
    default endpoint of `keras.layers.TFSMLayer`; `stage_outputs` (images -> every stage's
    feature map);
  - assets/invp_export.json (image_size, dims, normalisation, source run's name and checkpoint,
    the decode limits, the import's origin), assets/flags.txt (the recipe, local paths cut to
    their last name: an export discloses no folder of the machine it was made on), the model card
    (`model_card`: README.md, assets/MODEL_CARD.md, Kaggle's model-metadata.json) and, for a run
    imported from PyTorch, assets/imported.json.

The traps this module avoids (measured on TF 2.20): Keras 3 `model.export()` has no callable
object, so hub cannot fine-tune it; lists of Keras `Variable`s load in Python but break the
TF1 session loader of `saved_model_cli` and TF Serving, so the lists hold the backing
`tf.Variable`s. The export is checked through that TF1 loader before it is published, and it is
published atomically (written beside the target, then renamed), so TF Serving, which polls the
base folder for numeric version folders, never sees half an export. A staging folder left by a
killed export is removed by the next export of the model, with a warning naming it.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import time
import uuid

import numpy as np
import tensorflow as tf
from absl import logging

from invp_tf import augment
from invp_tf import image_headers
from invp_tf import model_card
from invp_tf import pretrained
from invp_tf import workdir as workdir_lib

SIGNATURES = ("serving_default", "serving_bytes")
METADATA_FILE = "invp_export.json"
# Accepted pixel range of `images`: [0, 1] widened for the overshoot of bicubic/Lanczos resizing
# in a client's own preprocessing, narrow enough to reject 0..255 pixels and mean/std-normalised
# images (both silently give wrong embeddings; REST clients cannot send a dtype to catch them).
PIXEL_RANGE = (-0.1, 1.1)
# Largest difference allowed between the reloaded export and the in-memory encoder, relative to
# the largest output value: kernel-order round-off is ~1e-5; a wrong variable or view is ~1.
_VERIFY_TOLERANCE = 1e-3
# A staging folder of another host this old is a leftover (an export takes minutes).
_LEFTOVER_AGE_S = 24 * 3600


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
      limits: the `image_headers.DecodeLimits` of `serving_bytes`; None: the defaults.
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
        limits=None,
        card_path=None,
        origin_path=None,
    ):
        super().__init__(name="invp_encoder")
        self._held = _Untracked(encoder)
        self._image_size = int(image_size)
        self._limits = limits or image_headers.DecodeLimits()
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

        B may be 0: the outputs are then [0, D] and [0, F]. A batch above the export's
        --max_batch_size is refused first, in one line.
        """
        count = tf.concat([tf.shape(images), [0]], 0)[0]  # rank 0: left to check_images
        limit = self._limits.max_batch_size
        text = self._limits.text("max_batch_size")
        batch = tf.debugging.Assert(
            count <= limit,
            [
                tf.strings.format(
                    "images holds {} images, above the limit of {}" + text, (count, limit)
                )
            ],
        )
        with tf.control_dependencies([batch]):
            return self._serving_outputs(tf.identity(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        """image_bytes string [B] of encoded images -> {"embedding", "features"}, inference.

        A request above the export's `DecodeLimits` fails before decoding; B may be 0.
        """
        images = image_headers.decode_images(image_bytes, self._image_size, self._limits)
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


def run_name(workdir):
    """The name of the run folder `workdir` (its last path component): what an export says of
    where it came from, rather than a folder of the machine it was made on."""
    if "://" in workdir:
        return workdir.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(os.path.abspath(workdir))


def portable_flags(text, name):
    """A run's flags.txt for an export: --workdir becomes the run's `name`, and every other
    absolute local path (also in `folder:/path`) its last component."""
    lines = ["# --workdir is the run's name; other local paths are cut to their last name."]
    for line in text.splitlines():
        flag, sep, value = line.partition("=")
        prefix = "folder:" if value.startswith("folder:") else ""
        path = value[len(prefix) :]
        if flag == "--workdir":
            value = name
        elif sep and "://" not in path and os.path.isabs(path):
            value = prefix + os.path.basename(os.path.normpath(path))
        lines.append(flag + sep + value)
    return "\n".join(lines) + "\n"


def _write_metadata(path, run, workdir, l2_regularization, limits):
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
        "workdir": run_name(workdir),
        "l2_regularization": l2_regularization,
        **dataclasses.asdict(limits),
        "checkpoint": os.path.basename(run.checkpoint),
        "signatures": list(SIGNATURES),
    }
    record = pretrained.read_record(workdir)
    if record is not None:
        metadata["origin"] = {key: record[key] for key in ("file", "sha256", "format", "epoch")}
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata, record


def _host_tag():
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _staging_name(version):
    # A dot-folder beside the target (not a numeric version: TF Serving ignores it), named
    # after its writer so that the next export can tell a killed one from a running one.
    return f".{version}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_leftover(model_dir, name):
    """Whether the staging folder `name` in `model_dir` is of an export that is gone: its
    process is not running on this host, it is older than a day (another host), or it has
    the writer-less name of older versions."""
    match = re.fullmatch(r"\.\d+\.tmp-(?:([0-9a-f]{8})-(\d+)-)?[0-9a-f]+", name)
    if not match:
        return False
    host, pid = match.groups()
    if host is None:
        return True
    if host == _host_tag():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass
        return False
    try:
        age = time.time() - tf.io.gfile.stat(os.path.join(model_dir, name)).mtime_nsec / 1e9
    except tf.errors.OpError:
        return False
    return age > _LEFTOVER_AGE_S


def remove_leftovers(model_dir):
    """Removes the staging folders of killed exports in `model_dir`, a warning naming each."""
    names = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir)]
    for name in sorted(names):
        if _is_leftover(model_dir, name):
            path = os.path.join(model_dir, name)
            logging.warning("Removing %s, left by an export that did not finish.", path)
            with contextlib.suppress(tf.errors.NotFoundError):
                tf.io.gfile.rmtree(path)


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


def _write_staging(staging, run, workdir, model_name, l2_regularization, limits):
    """Writes the SavedModel of `run` to `staging`/saved_model and checks it; returns its path."""
    config = run.config
    metadata_path = os.path.join(staging, METADATA_FILE)
    metadata, record = _write_metadata(metadata_path, run, workdir, l2_regularization, limits)
    card = model_card.text(metadata, record)
    card_path = os.path.join(staging, model_card.CARD_ASSET)
    flags_path = os.path.join(staging, "flags.txt")
    with tf.io.gfile.GFile(os.path.join(workdir, "flags.txt")) as f:
        flags = portable_flags(f.read(), metadata["workdir"])
    for path, text in ((card_path, card), (flags_path, flags)):
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
    module = EncoderModule(
        run.encoder,
        config.image_size,
        l2_regularization=l2_regularization,
        metadata_path=metadata_path,
        flags_path=flags_path,
        limits=limits,
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
    return saved


def export_run(
    workdir,
    export_dir,
    model_name,
    version=0,
    l2_regularization=None,
    max_image_pixels=image_headers.DEFAULT_MAX_IMAGE_PIXELS,
    max_image_frames=0,
    max_batch_size=image_headers.DEFAULT_MAX_BATCH_SIZE,
    max_request_bytes=image_headers.DEFAULT_MAX_REQUEST_BYTES,
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
      max_image_pixels, max_image_frames, max_batch_size, max_request_bytes: the
        `image_headers.DecodeLimits` of `serving_bytes` (kept in the metadata).
      checkpoint: the checkpoint to export ("ckpt-2" or a path); None: the newest readable one
        (a corrupt newest one is skipped with a warning). It must match the run's flags.txt.

    Returns:
      The path of the version folder written.

    Raises:
      FileNotFoundError: `workdir` is not a run or has no checkpoint.
      ValueError: bad model name, version or limit, or the version folder exists.
      ExportError: the written SavedModel failed its check (nothing is published).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name or ""):
        raise ValueError(
            f"--model_name={model_name!r} must be a folder name (letters, digits, _ . -)"
        )
    if version < 0:
        raise ValueError(f"--version={version} must be a positive integer (0 = next free)")
    limits = image_headers.DecodeLimits(
        max_image_pixels, max_image_frames, max_batch_size, max_request_bytes
    )
    limits.validate()
    model_dir = os.path.join(export_dir, model_name)
    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise ValueError(
            f"{model_dir} is a file, not a folder of versions: pick another --model_name "
            "or --export_dir"
        )
    run = workdir_lib.load_run(workdir, checkpoint=checkpoint)
    version = version or next_version(model_dir)
    target = os.path.join(model_dir, str(version))
    if tf.io.gfile.exists(target):
        raise ValueError(f"{target} already exists; pick another --version or omit it")
    if l2_regularization is None:
        l2_regularization = run.config.weight_decay / 2
    if l2_regularization < 0:
        raise ValueError(f"--l2_regularization={l2_regularization} must be >= 0")
    # Every path goes through tf.io.gfile: export_dir may be gs://, s3://, hdfs://, ram://.
    tf.io.gfile.makedirs(model_dir)
    remove_leftovers(model_dir)
    staging = os.path.join(model_dir, _staging_name(version))
    tf.io.gfile.makedirs(staging)
    try:
        saved = _write_staging(staging, run, workdir, model_name, l2_regularization, limits)
        try:
            _publish(saved, target)
        except tf.errors.OpError as e:  # another export took this version meanwhile
            raise ExportError(f"could not publish {target}: {e.message}") from e
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return target
