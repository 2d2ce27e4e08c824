"""Batch embeddings of an exported model (see invp_tf.saved_model), streamed to disk.

`embed(model_dir, output, images=... | dataset=...)` is the library of `invp_tf.embed`.

Images are read, decoded and resized/cropped in a parallel tf.data pipeline with the eval view of
training (`augment.eval_view`, the same op `serving_bytes` applies) and embedded batch by batch
through the model's `serving_default` signature, so the file holds exactly what the served model
returns. Memory stays bounded by one batch: rows go straight to disk.

The files written (FILE.npy or FILE.tfrecord, with FILE.ids.tsv beside it, and optionally the
ScaNN index FILE.scann/) are described in `invp_tf.embed`, the command; `embed` writes them
atomically.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from invp_tf import augment
from invp_tf import data
from invp_tf import image_headers
from invp_tf import input_pipeline
from invp_tf import neighbors
from invp_tf import saved_model

OUTPUT_FORMATS = (".npy", ".tfrecord")
OUTPUT_KEYS = ("embedding", "features")


class EmbedError(RuntimeError):
    """An input image could not be read; the output was not written."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What to embed, in a fixed order.

    Attributes:
      dataset: batches (images float32 [B, S, S, 3], index int32 [B], label int32 [B]).
      num_images: N, the number of examples the dataset yields.
      ids: fn(index) -> the id written for that example (a path or the index).
      paths: image files (folder inputs), row i = paths[i], to name an unreadable one.
    """

    dataset: tf.data.Dataset
    num_images: int
    ids: Callable[[int], str]
    paths: tuple[str, ...] | None = None


def _decode_file(path, image_size):
    # As the folder source and serving_bytes: first frame, grey/RGBA -> RGB, then the eval view.
    # The folder datasets' read: an image above their pixel limit is refused undecoded.
    data = image_headers.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return augment.eval_view(tf.ensure_shape(image, [None, None, 3]), image_size)


def folder_inputs(folder, image_size, batch_size):
    """Every image under `folder` (recursively), in sorted path order; ids are relative paths.

    Raises:
      FileNotFoundError: `folder` does not exist.
      ValueError: it holds no image files.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images folder {folder} does not exist")
    names = data.list_images(folder)
    if not names:
        raise ValueError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) found under {folder}")
    paths = tuple(os.path.join(folder, name) for name in names)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), tf.range(len(paths), dtype=tf.int32)))
    ds = ds.map(
        lambda path, index: (_decode_file(path, image_size), index, tf.constant(-1, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return Inputs(
        input_pipeline.pipeline_options(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)),
        len(names),
        names.__getitem__,
        paths,
    )


def dataset_inputs(dataset, split, data_dir, image_size, batch_size):
    """One split of a dataset through `input_pipeline.eval_pipeline`, in source order.

    Ids are the example index, or the image path for folder: datasets.

    Raises:
      ValueError, FileNotFoundError: from `data.load_source` (unknown dataset, missing files),
        or the split does not exist.
    """
    source = data.load_source(dataset, split, data_dir or None)
    if source is None:
        raise ValueError(f"{dataset} has no {split!r} split")
    pipeline = input_pipeline.eval_pipeline(source, batch_size=batch_size, image_size=image_size)
    ids = source.paths.__getitem__ if source.paths else str
    return Inputs(pipeline, source.num_examples, ids, source.paths)


def load_model(model_dir):
    """Loads an export; returns (serving_default function, metadata dict).

    Raises:
      FileNotFoundError: no SavedModel at `model_dir`.
      ValueError: a SavedModel that is not an invp_tf export.
    """
    if not tf.saved_model.contains_saved_model(model_dir):
        raise FileNotFoundError(
            f"--model={model_dir} is not a SavedModel folder (give BASE/NAME/VERSION, as written "
            "by python -m invp_tf.export)"
        )
    loaded = tf.saved_model.load(model_dir)
    if not hasattr(loaded, "metadata") or "serving_default" not in loaded.signatures:
        raise ValueError(f"{model_dir} is not an invp_tf export (no {saved_model.METADATA_FILE})")
    with tf.io.gfile.GFile(loaded.metadata.asset_path.numpy().decode()) as f:  # gs:// too
        metadata = json.load(f)
    return loaded.signatures["serving_default"], metadata


def _tsv_field(value):
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _example(item_id, row, label, vector):
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[item_id.encode()])),
                "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[row])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=vector)),
            }
        )
    ).SerializeToString()


def _check_output(output):
    ext = os.path.splitext(output)[1]
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"--output={output} must end with {' or '.join(OUTPUT_FORMATS)}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    return os.path.splitext(output)[0]


def embed(
    model_dir,
    output,
    *,
    images=None,
    dataset=None,
    split="train",
    data_dir=None,
    batch_size=256,
    output_key="embedding",
    with_knn_index=False,
    index_neighbors=10,
    verbose=True,
):
    """Embeds a folder of images or a dataset split with an exported model; writes `output`.

    Args:
      model_dir: the export's version folder, BASE/NAME/VERSION.
      output: FILE.npy or FILE.tfrecord (FILE.ids.tsv is written beside it).
      images: a folder; every image below it is embedded (exclusive with `dataset`).
      dataset: a `data.load_source` dataset string (`data.DATASET_FORMS`).
      split: the dataset split.
      data_dir: the dataset's data_dir (IDX folder, tfds data_dir).
      batch_size: images per call of the model.
      output_key: "embedding" (L2-normalised) or "features" (pooled backbone).
      with_knn_index: also write a ScaNN index FILE.scann/.
      index_neighbors: default number of neighbours of the index's searches.
      verbose: show a progress bar.

    Returns:
      dict: num_images, dim, seconds, images_per_second, output, ids (paths written).

    Raises:
      ValueError, FileNotFoundError: bad arguments or inputs (nothing written).
      EmbedError: an image file cannot be decoded (nothing written).
    """
    if (images is None) == (dataset is None):
        raise ValueError("give exactly one of --images and --dataset")
    if output_key not in OUTPUT_KEYS:
        raise ValueError(f"--output_key={output_key} is not one of {', '.join(OUTPUT_KEYS)}")
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be >= 1")
    stem = _check_output(output)
    ids_path, index_dir = stem + ".ids.tsv", stem + ".scann"
    if with_knn_index and os.path.exists(index_dir):
        raise ValueError(f"{index_dir} already exists; remove it or pick another --output")
    serve, metadata = load_model(model_dir)
    image_size = metadata["image_size"]
    dim = metadata["embedding_dim" if output_key == "embedding" else "feature_dim"]
    if images is not None:
        inputs = folder_inputs(images, image_size, batch_size)
    else:
        inputs = dataset_inputs(dataset, split, data_dir, image_size, batch_size)
    n = inputs.num_images

    # Everything is written into a hidden folder beside the output and moved into place at the
    # end, the output file last: an output that exists is complete.
    staging = tempfile.mkdtemp(prefix=".embed-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        writer = _Writer(staging, n, dim, tfrecord=output.endswith(".tfrecord"))
        seconds = _embed_batches(inputs, serve, output_key, writer, batch_size, verbose)
        writer.close()
        if writer.rows != n:
            raise RuntimeError(f"the input pipeline yielded {writer.rows} images, expected {n}")
        if with_knn_index:
            neighbors.build_search_index(
                np.load(writer.array_path, mmap_mode="r"),
                os.path.join(staging, "index"),
                index_neighbors,
            )
            os.replace(os.path.join(staging, "index"), index_dir)
        os.replace(writer.ids_path, ids_path)
        os.replace(writer.tfrecord_path if writer.tfrecord else writer.array_path, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "num_images": n,
        "dim": dim,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 1),
        "output": output,
        "ids": ids_path,
        "index": index_dir if with_knn_index else None,
    }


def _embed_batches(inputs, serve, output_key, writer, batch_size, verbose):
    """Embeds every batch of `inputs` with `serve` into `writer`; returns the seconds taken.

    Raises:
      EmbedError: an image failed to decode (named when the inputs are files).
    """
    progress = _Progress(inputs.num_images, enabled=verbose)
    start = time.perf_counter()
    batches = iter(inputs.dataset)
    while True:
        try:
            images, index, label = next(batches)
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError as e:
            raise EmbedError(_name_unreadable(inputs, writer.rows, batch_size, e)) from None
        vectors = serve(images=images)[output_key].numpy()  # [B, dim]
        index = index.numpy()
        writer.write([inputs.ids(int(i)) for i in index], index, label.numpy(), vectors)
        progress.update(writer.rows)
    progress.finish(writer.rows)
    return time.perf_counter() - start


class _Progress:
    """A one-line progress bar on stderr (stdout keeps only the JSON summary); off a terminal,
    one line every 30 s."""

    def __init__(self, total, enabled=True, width=30):
        self.total, self.enabled, self.width = total, enabled, width
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done, force=False):
        now = time.perf_counter()
        if not self.enabled or not (force or self.tty or now - self.last >= 30):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        filled = self.width * done // max(self.total, 1)
        line = (
            f"[{'=' * filled}{'.' * (self.width - filled)}] {done}/{self.total} images, "
            f"{rate:.0f} img/s, {(self.total - done) / max(rate, 1e-9):.0f} s left"
        )
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)

    def finish(self, done):
        self.update(done, force=True)
        if self.enabled and self.tty:
            print(file=sys.stderr)


class _Writer:
    """Streams batches of rows into `staging`: rows.npy (disk-backed, preallocated [N, dim]),
    ids.tsv and, when `tfrecord`, rows.tfrecord. Memory: one batch."""

    def __init__(self, staging, num_rows, dim, tfrecord):
        self.array_path = os.path.join(staging, "rows.npy")
        self.ids_path = os.path.join(staging, "ids.tsv")
        self.tfrecord_path = os.path.join(staging, "rows.tfrecord")
        self.tfrecord = tfrecord
        self.rows = 0
        self._array = np.lib.format.open_memmap(
            self.array_path, mode="w+", dtype=np.float32, shape=(num_rows, dim)
        )
        self._ids = open(self.ids_path, "w")  # closed by close()
        self._ids.write("id\tlabel\n")
        self._records = tf.io.TFRecordWriter(self.tfrecord_path) if tfrecord else None

    def write(self, ids, indices, labels, vectors):
        """ids [B] str, indices [B] int, labels [B] int, vectors [B, dim] float32."""
        self._array[self.rows : self.rows + len(vectors)] = vectors
        for item_id, index, label, vector in zip(ids, indices, labels, vectors, strict=True):
            self._ids.write(f"{_tsv_field(item_id)}\t{label}\n")
            if self._records is not None:
                self._records.write(_example(item_id, int(index), int(label), vector))
        self.rows += len(vectors)

    def close(self):
        self._array.flush()
        del self._array
        self._ids.close()
        if self._records is not None:
            self._records.close()


def _name_unreadable(inputs, done, batch_size, error):
    """The message for a decode failure in the batch starting at row `done`."""
    if inputs.paths:
        for path in inputs.paths[done : done + batch_size]:
            try:
                image_headers.check_file(path)
            except ValueError as refused:
                return str(refused)
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            except (tf.errors.OpError, ValueError):
                return f"unreadable image: {path}"
    return f"an image of rows {done}..{done + batch_size - 1} failed to decode: {error.message}"
