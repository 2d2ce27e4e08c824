"""A run's identity, recorded in each of its checkpoints: its flags and its training data.

`rundir.RunDir.open` checks a rerun against the record of the run's newest checkpoint before
it writes anything, so a lost or edited flags.txt (a readable copy of the record) cannot let a
rerun with another model, loss or seed, or on other data, continue the run silently. The
record is a JSON string variable beside the checkpoint's parts (`variable`, `read`):

    {"flags": {every Config field but workdir: value},
     "dataset": {"dataset", "split", "examples", "fingerprint", and "files" (IDX: SHA-256
                 of each file) or "tfds" (name, version, split read)}, or null when unknown}

The data's `fingerprint` follows what defines its examples, read without decoding any: IDX
files by their bytes, a tfds dataset by name, version and the split and slice read, a folder
by the sorted relative paths and sizes of its images (stat'ed while listing). A folder run
also keeps the listing it was trained on in its run folder (workdir.DATASET_FILE), so that a
changed folder is named file by file: added, removed, replaced (size changed).
"""

import dataclasses
import gzip
import hashlib
import json
import os

import tensorflow as tf

from invp_tf import config as config_lib
from invp_tf import digests
from invp_tf import workdir as workdir_lib

# The record's name in a checkpoint (a child of its root, beside workdir.CHECKPOINT_PARTS).
NAME = "identity"
_KEY = f"{NAME}/.ATTRIBUTES/VARIABLE_VALUE"
# How many names of changed files a message shows.
_SHOWN = 5


def fingerprint(source) -> str:
    """SHA-256 (hex) of what defines the examples of `source` (a data.Source), read without
    decoding.

    The dataset's name (not a folder's path), split and size; for IDX data the bytes of its
    files; for tfds the dataset's version and the split read; for folders every image's path
    under the root and its size (read while listing). Two sources with the same fingerprint
    yield the same examples at the same indices (a folder file rewritten in place at the same
    size aside).
    """
    # A folder is known by its listing, wherever it lies.
    name = "folder:" if source.paths is not None else source.name
    digest = hashlib.sha256(f"{name}\0{source.split}\0{source.num_examples}".encode())
    for item in source.origin:
        if os.path.isfile(item):
            digests.update_with_file(digest, item)
        else:
            digest.update(f"\0{item}".encode())
    for path, size in listing(source) or ():
        digest.update(f"\0{path}\0{size}".encode())
    return digest.hexdigest()


def listing(source):
    """[[path under the dataset's root, size in bytes]] of a folder source's images, in index
    order; None for other sources."""
    if source.paths is None:
        return None
    root = source.name[len("folder:") :]
    sizes = source.sizes or [os.path.getsize(path) for path in source.paths]
    return [[os.path.relpath(p, root), size] for p, size in zip(source.paths, sizes, strict=True)]


def dataset_record(source):
    """The record of the training data `source` (a data.Source): see the module docstring."""
    record = {
        "dataset": source.name,
        "split": source.split,
        "examples": source.num_examples,
        "fingerprint": fingerprint(source),
    }
    if source.paths is None and source.origin:
        files = [item for item in source.origin if os.path.isfile(item)]
        if files:
            record["files"] = {os.path.basename(path): digests.file_sha256(path) for path in files}
        else:
            record["tfds"] = dict(zip(("name", "version", "split"), source.origin, strict=True))
    return record


def some_names(names, limit=_SHOWN):
    """'a, b, c, d, e and 7 more': the first `limit` of `names`, and how many are left out."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# ---------------------------------------------------------------------------
# The record in a checkpoint.


@dataclasses.dataclass(frozen=True)
class Record:
    """The identity a checkpoint records.

    Attributes:
      config: the run's flags (a config.Config; --workdir: the folder read).
      dataset: its `dataset_record`; None when the run did not know it (an import).
      checkpoint: the path of the checkpoint read.
    """

    config: config_lib.Config
    dataset: dict | None
    checkpoint: str


def variable():
    """The string variable a checkpoint carries its record in (on the host)."""
    with tf.device("/cpu:0"):
        return tf.Variable("", dtype=tf.string, trainable=False, name=NAME)


def record_text(config, dataset):
    """The JSON text of the record of `config` and `dataset` (a dataset_record or None)."""
    flags = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config_lib.Config)
        if field.name != "workdir"
    }
    return json.dumps({"flags": flags, "dataset": dataset}, sort_keys=True)


def read(workdir):
    """The Record of the newest readable checkpoint of `workdir`.

    Returns:
      None when the run has no checkpoint, or when its newest one was written before
      checkpoints carried a record (flags.txt is the run's record then).
    """
    fields = {field.name for field in dataclasses.fields(config_lib.Config)}
    for path in workdir_lib.checkpoint_paths(workdir):
        try:
            reader = tf.train.load_checkpoint(path)
            if not reader.has_tensor(_KEY):
                return None
            value = json.loads(reader.get_tensor(_KEY))
        except Exception:  # noqa: BLE001 (unreadable: its restore names it and falls back)
            continue
        flags = {name: v for name, v in value["flags"].items() if name in fields}
        return Record(config_lib.Config(**{**flags, "workdir": workdir}), value["dataset"], path)
    return None


# ---------------------------------------------------------------------------
# The data a run was trained on.


def keep_listing(workdir, dataset, files):
    """Writes workdir/DATASET_FILE (atomically): the fingerprint of `dataset` (its record) and
    `files` (its listing), unless it holds that fingerprint already."""
    if (read_listing(workdir) or {}).get("fingerprint") == dataset["fingerprint"]:
        return
    text = json.dumps({"fingerprint": dataset["fingerprint"], "files": files})
    workdir_lib.write_atomically(
        os.path.join(workdir, workdir_lib.DATASET_FILE),
        gzip.compress(text.encode(), mtime=0),
        "the listing of the training images",
    )


def read_listing(workdir):
    """{"fingerprint", "files": [[path, size]]} of workdir/DATASET_FILE; None when absent or
    unreadable."""
    path = os.path.join(workdir, workdir_lib.DATASET_FILE)
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return json.loads(gzip.decompress(f.read()))
    except (OSError, EOFError, ValueError, tf.errors.OpError):
        return None


def listing_changes(old, new):
    """'2 added (a.png, b.png), 1 removed (c.png), 1 replaced (size changed: d.png)': how the
    listing `new` ([[path, size]]) differs from `old`."""
    old, new = dict(map(tuple, old)), dict(map(tuple, new))
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    replaced = sorted(path for path in set(old) & set(new) if old[path] != new[path])
    parts = [f"{len(added)} added ({some_names(added)})"] if added else []
    parts += [f"{len(removed)} removed ({some_names(removed)})"] if removed else []
    if replaced:
        parts.append(f"{len(replaced)} replaced (size changed: {some_names(replaced)})")
    return ", ".join(parts) or "the same files in another order"


def _differences(old, new):
    """What differs between two dataset records of non-folder data, named."""
    out = [
        f"{key} {new.get(key)} (the run's: {old.get(key)})"
        for key in ("dataset", "split", "examples")
        if old.get(key) != new.get(key)
    ]
    old_tfds, new_tfds = old.get("tfds") or {}, new.get("tfds") or {}
    for key in ("name", "version", "split"):
        if old_tfds.get(key) != new_tfds.get(key):
            out.append(f"tfds {key} {new_tfds.get(key)} (the run's: {old_tfds.get(key)})")
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            out.append(f"{name} is no longer read")
        elif name not in old_files:
            out.append(f"{name} is read instead")
        elif old_files[name] != new_files[name]:
            out.append(
                f"{name} has other bytes (sha256 {new_files[name][:12]}..., the run's "
                f"{old_files[name][:12]}...)"
            )
    return ", ".join(out) or f"its fingerprint differs (the run's: {old.get('fingerprint')})"


def check_dataset(workdir, record, dataset, files):
    """Raises WorkdirError naming what changed when the training data is not the data the
    run's checkpoint was trained on.

    Args:
      workdir: the run folder.
      record: the run's Record.
      dataset: the `dataset_record` of the training data given.
      files: its `listing` (folder data), or None.
    """
    old = record.dataset
    if old is None or old["fingerprint"] == dataset["fingerprint"]:
        return
    what = "data"
    if files is not None:
        what = "images"
        saved = read_listing(workdir)
        if saved and saved.get("fingerprint") == old["fingerprint"]:
            changes = listing_changes(saved["files"], files)
        else:
            changes = (
                f"other images ({workdir_lib.DATASET_FILE}, the listing the run was trained on, "
                "is missing, so the files cannot be named)"
            )
    else:
        changes = _differences(old, dataset)
    raise workdir_lib.WorkdirError(
        f"the training {what} of --dataset={dataset['dataset']} changed since the run in "
        f"{workdir} was trained on it ({os.path.basename(record.checkpoint)}): {changes}; its "
        f"memory bank holds one row per training example, so it cannot continue on other "
        f"{what}: restore the {what} or train into a new --workdir"
    )
