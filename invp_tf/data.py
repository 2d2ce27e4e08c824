"""Dataset sources with a stable example index, their image files, subsets and image checks.

Every source yields unbatched dicts
  {"image": uint8 [H, W, 3], "index": int32 in [0, N), "label": int32 (-1 when unknown)}.
Grey data (Fashion-MNIST, grey tfds datasets) is tiled to 3 channels here, so every later
stage sees RGB. `index` identifies the example (it addresses the memory bank and the kNN
graph), so it never depends on shuffling.

Three dataset string forms are understood by `load_source`:
  fashion_mnist / mnist   gzip IDX files (Debian package dataset-fashion-mnist)
  tfds:NAME               a prepared TensorFlow Datasets dataset (never downloaded here)
  folder:/path            a folder of images, optionally with class subfolders

The train and eval tf.data pipelines over a Source are in `input_pipeline`.
"""

import dataclasses
import gzip
import itertools
import math
import os
import struct
import zlib
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from invp_tf import image_headers

AUTOTUNE = tf.data.AUTOTUNE

DATASET_FORMS = "fashion_mnist, mnist, tfds:NAME (e.g. tfds:cifar10), folder:/path/to/images"

# Default locations of the Debian packages dataset-fashion-mnist / dataset-mnist.
_IDX_DEFAULT_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Other image formats: not read (tf.io.decode_image cannot decode most of them, and serving
# reads only the four above), but named in a warning, never left out silently.
OTHER_IMAGE_EXTENSIONS = tuple(".webp .tif .tiff .heic .heif .avif .jp2 .jxl .ico .psd".split())
# File signatures of the formats tf.io.decode_image reads.
_IMAGE_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
# Folders up to this size get a cheap signature check of every file in load_source.
_EAGER_CHECK_MAX_FILES = 20_000


@dataclasses.dataclass(frozen=True)
class Source:
    """One split of one dataset.

    Attributes:
      name: the dataset string given to `load_source`.
      split: "train" or "test" (tfds: the actual split name read, e.g. "validation").
      num_examples: N; `index` takes the values [0, N).
      num_classes: number of classes, or None when unknown / unlabelled.
      image_shape: native (H, W, 3) of the yielded images, or None when sizes vary.
      paths: folder sources: the image file of each index (paths[index]); else None.
      sizes: folder sources: the size in bytes of each file (sizes[index]), read while
        listing (-1: the file could not be read); else None.
      exact_shuffle: True when `dataset(shuffle_files=True)` is already a uniform random
        permutation of the examples (in-memory and folder sources shuffle the example list
        before decoding), so no shuffle buffer of decoded images is needed. tfds sources only
        shuffle the order of their shard files.
      make_dataset: fn(shuffle_files, seed) -> tf.data.Dataset; use `dataset()`.
      decode: None when `make_dataset` yields decoded images; else fn(example) -> example that
        decodes the example `make_dataset` yields (tfds, folders: "image" is encoded bytes or
        a path), so that the train pipeline can drop other workers' examples first.
      read: None, or fn(example) -> example whose "image" is the encoded file (tf.string),
        for views that decode only what they crop (`augment.takes_encoded`).
    """

    name: str
    split: str
    num_examples: int
    num_classes: int | None
    image_shape: tuple[int, int, int] | None
    paths: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)
    sizes: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    exact_shuffle: bool = False
    make_dataset: Callable[[bool, int], tf.data.Dataset] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    decode: Callable[[dict], dict] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    read: Callable[[dict], dict] | None = dataclasses.field(default=None, repr=False, compare=False)
    # What else identifies the examples, for `identity.fingerprint`: IDX files read, or tfds'
    # (name, version, split read).
    origin: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def dataset(
        self, shuffle_files: bool = False, seed: int = 0, decoded: bool = True
    ) -> tf.data.Dataset:
        """The unbatched examples {"image", "index", "label"}.

        Args:
          shuffle_files: shuffle at file level (see `exact_shuffle`); no other shuffling.
          seed: seed of that file-level shuffle.
          decoded: False: leave "image" as the source stores it (see `decode`); for
            filtering before decoding and for reading labels only.

        Returns:
          tf.data.Dataset of dicts: image uint8 [H, W, 3], index int32 [], label int32 [].
        """
        ds = self.make_dataset(shuffle_files, seed)
        if decoded and self.decode is not None:
            ds = ds.map(self.decode, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds


def load_source(
    dataset: str, split: str = "train", data_dir: str | None = None, train_examples: int = 0
) -> Source | None:
    """Opens one split of a dataset; all checks happen here, with one clear message.

    Args:
      dataset: one of DATASET_FORMS (the module docstring says what each reads).
      split: "train" or "test". tfds: any split name; "test" falls back to "validation"
        when the dataset has no test split. folder: "val"/"validation" mean "test".
      data_dir: IDX: folder of the .gz files (default: the Debian package's folder);
        tfds: the tfds data_dir (default: tfds' own default); folder: unused.
      train_examples: if > 0 keep only the first n examples (indices stay [0, n)).

    Returns:
      A Source, or None when "test" does not exist (a tfds dataset with neither test nor
      validation split), or for a folder dataset that has no such split (a folder without
      train/ and test/ (or val/) subfolders is all "train").

    Raises:
      ValueError: unknown dataset form or split, corrupt IDX file, empty image folder,
        unreadable image (folders of <= 20,000 files get a file signature check here),
        tfds dataset not prepared, bad `train_examples`.
      FileNotFoundError: missing data folder or IDX file.
    """
    if train_examples < 0:
        raise ValueError(f"train_examples must be >= 0 (0 = all), got {train_examples}")
    if dataset in _IDX_DEFAULT_DIRS:
        return _idx_source(dataset, split, data_dir or _IDX_DEFAULT_DIRS[dataset], train_examples)
    elif dataset.startswith("tfds:"):
        return _tfds_source(dataset, split, data_dir, train_examples)
    elif dataset.startswith("folder:"):
        return _folder_source(dataset, split, train_examples)
    raise ValueError(f"unknown dataset {dataset!r}; valid forms: {DATASET_FORMS}")


def _check_train_examples(train_examples, num_examples, dataset, split):
    if train_examples > num_examples:
        raise ValueError(
            f"train_examples={train_examples} exceeds the {num_examples} examples of "
            f"{dataset} split {split!r}"
        )
    return train_examples or num_examples


# ----------------------------------------------------------------------------- IDX


def _read_idx(path, ndim):
    """Reads a (gzip) IDX file of unsigned bytes with `ndim` dims -> uint8 numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt IDX file {path}: {e}") from None
    expected_magic = 0x0800 + ndim  # 0x08 = unsigned byte, then the number of dims
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"corrupt IDX file {path}: truncated header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"corrupt IDX file {path}: magic number 0x{magic:08x}, "
            f"expected 0x{expected_magic:08x} (uint8 data with {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, np.uint8, offset=header)
    if body.size != math.prod(dims):
        raise ValueError(
            f"corrupt IDX file {path}: header says {dims} = {math.prod(dims)} bytes, "
            f"found {body.size} (truncated?)"
        )
    return body.reshape(dims)


def _idx_path(data_dir, stem, dataset):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"missing IDX file {os.path.join(data_dir, stem + '.gz')}; install the data with "
        f"`apt-get install dataset-{dataset.replace('_', '-')}` or point --data_dir at a "
        f"folder with {stem}.gz"
    )


def _idx_source(name, split, data_dir, train_examples):
    if split not in _IDX_FILES:
        raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"{name} data folder {data_dir} does not exist; install it with "
            f"`apt-get install dataset-{name.replace('_', '-')}` or pass --data_dir"
        )
    images_stem, labels_stem = _IDX_FILES[split]
    images_path = _idx_path(data_dir, images_stem, name)
    labels_path = _idx_path(data_dir, labels_stem, name)
    images = _read_idx(images_path, 3)  # [N, H, W]
    labels = _read_idx(labels_path, 1)  # [N]
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    n = _check_train_examples(train_examples, len(images), name, split)
    images, labels = images[:n], labels[:n]  # the first n examples: indices [0, n)
    _, h, w = images.shape

    def make_dataset(shuffle_files, seed):
        ds = tf.data.Dataset.from_tensor_slices(
            {"image": images[..., None], "index": tf.range(n, dtype=tf.int32), "label": labels}
        )
        if shuffle_files:
            # Whole split in memory: a buffer of N small elements is an exact shuffle.
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=False)

        def to_rgb(ex):
            image = tf.tile(ex["image"], [1, 1, 3])  # [H, W, 1] -> [H, W, 3]
            return {"image": image, "index": ex["index"], "label": tf.cast(ex["label"], tf.int32)}

        return ds.map(to_rgb, num_parallel_calls=AUTOTUNE, deterministic=True)

    return Source(
        name=name,
        split=split,
        num_examples=n,
        num_classes=10,
        image_shape=(h, w, 3),
        exact_shuffle=True,
        make_dataset=make_dataset,
        origin=(images_path, labels_path),
    )


# ----------------------------------------------------------------------------- tfds


def tfds_id_to_index(tfds_id, shard_lengths):
    """Maps tfds ids to stable integer indices.

    A tfds id such as "cifar10-train.tfrecord-00001-of-00004__123" names record 123 of shard
    1; its index is (number of records in shards 0..shard-1) + record.

    Args:
      tfds_id: tf.string tensor of any shape.
      shard_lengths: the split's `shard_lengths` (records per shard file, in file order).

    Returns:
      int32 tensor of the shape of `tfds_id`.
    """
    offsets = tf.constant([0] + list(itertools.accumulate(shard_lengths))[:-1], tf.int64)
    shard = tf.strings.regex_replace(tfds_id, r"^.*-(\d+)-of-\d+__\d+$", r"\1")
    record = tf.strings.regex_replace(tfds_id, r"^.*__(\d+)$", r"\1")
    shard = tf.strings.to_number(shard, tf.int64)
    record = tf.strings.to_number(record, tf.int64)
    return tf.cast(tf.gather(offsets, shard) + record, tf.int32)


def _tfds_source(dataset, split, data_dir, train_examples):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(
            f"{dataset} needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from None
    name = dataset[len("tfds:") :]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:  # keep one clear line
        raise ValueError(f"unknown tfds dataset {name!r}: {str(e).splitlines()[0]}") from None
    splits = builder.info.splits
    if not len(splits):
        root = data_dir or os.path.dirname(os.path.dirname(builder.data_dir))
        manual = os.path.join(root, "downloads", "manual")
        raise ValueError(
            f"tfds dataset {name!r} is not prepared: nothing found in {builder.data_dir}. "
            f"Prepare it once with `tfds build {name} --data_dir={root}` (for manual-download "
            f"datasets such as imagenet2012 put the archives in {manual} first), then pass "
            f"--data_dir={root}. This code never downloads."
        )
    if split == "test" and "test" not in splits and "validation" in splits:
        split = "validation"
    if split == "test" and split not in splits:
        return None  # a dataset with no held-out split: nothing to monitor on
    if split not in splits:
        raise ValueError(f"tfds dataset {name!r} has splits {sorted(splits)}, not {split!r}")
    info = splits[split]
    n = _check_train_examples(train_examples, info.num_examples, dataset, split)
    shard_lengths = list(info.shard_lengths)
    read_split = f"{split}[:{train_examples}]" if train_examples else split
    features = builder.info.features
    has_label = "label" in features
    num_classes = getattr(features["label"], "num_classes", None) if has_label else None
    shape = tuple(features["image"].shape)
    image_shape = None if None in shape else (shape[0], shape[1], 3)

    def make_dataset(shuffle_files, seed):
        read_config = tfds.ReadConfig(
            add_tfds_id=True, shuffle_seed=seed, shuffle_reshuffle_each_iteration=False
        )
        # Images stay encoded here (Source.decode decodes them): a worker of a sharded run
        # decodes only its own examples.
        ds = builder.as_dataset(
            split=read_split,
            shuffle_files=shuffle_files,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )

        def convert(ex):
            label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
            index = tfds_id_to_index(ex["tfds_id"], shard_lengths)
            return {"image": ex["image"], "index": index, "label": label}

        return ds.map(convert, num_parallel_calls=AUTOTUNE, deterministic=True)

    def decode(ex):
        image = features["image"].decode_example(ex["image"])
        if image.shape[-1] == 1:
            image = tf.tile(image, [1, 1, 3])
        return dict(ex, image=tf.ensure_shape(image, [None, None, 3]))

    return Source(
        name=dataset,
        split=split,
        num_examples=n,
        num_classes=num_classes,
        image_shape=image_shape,
        make_dataset=make_dataset,
        decode=decode,
        read=lambda ex: ex,  # already the encoded image
        origin=(name, str(builder.info.version), read_split),
    )


# ----------------------------------------------------------------------------- folder


def list_images(folder):
    """Sorted relative paths ("class/x.png") of the images under `folder` (`scan_images`)."""
    return [name for name, _ in scan_images(folder)]


def scan_images(folder):
    """[(relative path, size in bytes)] of the images under `folder`, recursively, sorted by
    path; one stat per image while listing (-1 where it fails).

    Symlinked folders are followed, each real folder at most once: a link back to a folder
    above it (a loop) or to a folder already listed is skipped and named in a warning, so
    every real image is listed once. Files of other image formats (OTHER_IMAGE_EXTENSIONS)
    are named in a warning, never left out silently.
    """
    found, others = [], []
    seen = {os.path.realpath(folder)}
    for parent, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(parent, d))
            if real in seen:
                here = os.path.realpath(parent)
                loop = here == real or here.startswith(real + os.sep)  # an ancestor of itself
                what = "a folder above it (a symlink loop)" if loop else "a folder listed already"
                logging.warning(
                    "Skipping %s: it links to %s, %s.", os.path.join(parent, d), real, what
                )
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        rel = os.path.relpath(parent, folder)
        for f in files:
            name = f if rel == "." else os.path.join(rel, f).replace(os.sep, "/")
            if f.startswith("."):
                continue
            if f.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    found.append((name, os.stat(os.path.join(parent, f)).st_size))
                except OSError:  # a dangling link: the signature check names it
                    found.append((name, -1))
            elif f.lower().endswith(OTHER_IMAGE_EXTENSIONS):
                others.append(name)
    if others:
        logging.warning(
            "%s holds %d image file(s) in formats this code does not read (it reads %s), left "
            "out: %s; convert them to JPEG or PNG to use them.",
            folder,
            len(others),
            ", ".join(IMAGE_EXTENSIONS),
            ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else ""),
        )
    return sorted(found)


def _class_names(folders):
    # Union of first-level subfolders over all splits, so train and test share label ids.
    names = set()
    for folder in folders:
        names.update(
            d
            for d in os.listdir(folder)
            if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))
        )
    return sorted(names)


def _has_image_signature(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGICS)


def _folder_source(dataset, split, train_examples):
    root = dataset[len("folder:") :]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    if split in ("val", "validation"):
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"folder datasets have splits 'train' and 'test', not {split!r}")
    split_dirs = {}
    if os.path.isdir(os.path.join(root, "train")):
        split_dirs["train"] = os.path.join(root, "train")
        for held_out in ("test", "val", "validation"):
            if os.path.isdir(os.path.join(root, held_out)):
                split_dirs["test"] = os.path.join(root, held_out)
                break
    else:
        split_dirs["train"] = root
    if split not in split_dirs:
        return None
    folder = split_dirs[split]
    listed = scan_images(folder)
    if not listed:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    listed = listed[: _check_train_examples(train_examples, len(listed), dataset, split)]
    files = [name for name, _ in listed]
    classes = _class_names(split_dirs.values())
    class_ids = {c: i for i, c in enumerate(classes)}
    # Images at the top level of a split folder have no class: label -1.
    labels = [class_ids[f.split("/")[0]] if "/" in f else -1 for f in files]
    paths = tuple(os.path.join(folder, f) for f in files)
    if len(paths) <= _EAGER_CHECK_MAX_FILES:
        # Reading 8 bytes per file costs ~0.1 s per 10k files; a full decode of every file
        # would cost minutes for photo-sized JPEGs, so that is left to check_images().
        for path in paths:
            if not _has_image_signature(path):
                raise ValueError(f"unreadable image: {path}")

    def make_dataset(shuffle_files, seed):
        n = len(paths)
        ds = tf.data.Dataset.from_tensor_slices(
            {"path": list(paths), "index": tf.range(n, dtype=tf.int32), "label": labels}
        )
        if shuffle_files:
            # One file per example: shuffling the path list (cheap strings) before decoding is
            # an exact shuffle without a buffer of decoded images.
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=False)
        # "image" is the path until Source.decode reads it: a worker of a sharded run reads
        # and decodes only its own files.
        return ds.map(
            lambda ex: {
                "image": ex["path"],
                "index": ex["index"],
                "label": tf.cast(ex["label"], tf.int32),
            }
        )

    def decode(ex):
        # An unreadable file raises tf.errors.InvalidArgumentError when iterated.
        data = image_headers.read_file(ex["image"])  # refused above the pixel limit
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return dict(ex, image=tf.ensure_shape(image, [None, None, 3]))

    return Source(
        name=dataset,
        split=split,
        num_examples=len(paths),
        num_classes=len(classes) or None,
        image_shape=None,
        paths=paths,
        sizes=tuple(size for _, size in listed),
        exact_shuffle=True,
        make_dataset=make_dataset,
        decode=decode,
        read=lambda ex: dict(ex, image=image_headers.read_file(ex["image"])),
    )


def find_unreadable_images(source: Source, limit: int | None = None) -> list[str]:
    """The image files of a folder source that cannot be read: gone or unreadable ones first
    (a cheap check of each), then the ones that fail an eager decode.

    Args:
      source: a Source; non-folder sources (paths None) have no files and give [].
      limit: stop after this many bad files (None: check all).

    Returns:
      The paths that cannot be read, then those that tf.io.decode_image cannot decode, each
      in index order.

    Raises:
      ValueError: a file above `image_headers.read_file`'s limit, named (it is not decoded).
    """
    paths = source.paths or ()
    bad = [path for path in paths if not os.access(path, os.R_OK)]  # gone: cheap to find
    gone = set(bad)
    for path in paths:
        if limit is not None and len(bad) >= limit:
            break
        if path in gone:
            continue
        image_headers.check_file(path)
        try:
            tf.io.decode_image(image_headers.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError):
            bad.append(path)
    return bad[:limit]


def check_images(source: Source) -> None:
    """Raises ValueError("unreadable image: <path>") for the first unreadable file of a folder
    source (`find_unreadable_images`); other sources always pass."""
    bad = find_unreadable_images(source, limit=1)
    if bad:
        raise ValueError(f"unreadable image: {bad[0]}")


# ----------------------------------------------------------------------------- pipelines


def labels_by_index(source: Source) -> np.ndarray:
    """[N] int32 labels in index order (-1 where unknown); reads labels only, in batches."""
    labels = np.full(source.num_examples, -1, np.int32)
    examples = source.dataset(decoded=False)  # no image is decoded for its label
    for index, label in examples.map(lambda ex: (ex["index"], ex["label"])).batch(4096):
        labels[index.numpy()] = label.numpy()
    return labels


def subset_source(source: Source, indices) -> Source:
    """The examples of `source` whose index is in `indices` (indices keep their values).

    The subset is read by filtering `source` in order, so its file-level shuffle is off;
    `train_pipeline` then shuffles the subset exactly with a buffer of its size.
    """
    indices = np.unique(np.asarray(indices, np.int64))
    if indices.size == 0:
        raise ValueError(f"empty subset of {source.name} split {source.split!r}")
    if indices[0] < 0 or indices[-1] >= source.num_examples:
        raise ValueError(
            f"subset indices must be in [0, {source.num_examples}) for {source.name}, got "
            f"[{indices[0]}, {indices[-1]}]"
        )
    member = np.zeros(source.num_examples, bool)
    member[indices] = True
    member = tf.constant(member)

    def make_dataset(shuffle_files, seed):
        del shuffle_files, seed
        # Filtered before decoding; `decode` (kept by dataclasses.replace) decodes the rest.
        return source.dataset(decoded=False).filter(lambda ex: tf.gather(member, ex["index"]))

    return dataclasses.replace(
        source,
        num_examples=int(indices.size),
        exact_shuffle=False,
        make_dataset=make_dataset,
    )
