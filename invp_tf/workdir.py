"""A run's work directory: its files, their formats, and the readers of a run.

Training writes a run through `rundir.RunDir`; the analysis, evaluation and export entry
points read it through `load_run`, so none of them has to import train's flags.

What lives in `--workdir` (names below):
  - flags.txt: a readable copy of the run's flags (rewritten only after a successful restore;
    a lost or edited one is rewritten from the checkpoint's record, see `identity`);
  - flags_history.txt: one appended line per start and per accepted flag change;
  - checkpoints/: `ckpt-N` of `tf.train.CheckpointManager` (parts in CHECKPOINT_PARTS, and
    the run's identity record: its flags and its data's fingerprint); every value finite;
  - dataset.json.gz: folder datasets: the fingerprint and [[path, size]] of the training
    images the run is trained on (gzip'd JSON), to name the files that changed;
  - metrics.jsonl: one JSON row per finished epoch;
  - train.lock: the pid and host of the training that writes the run.

Every problem a user can meet here is a `WorkdirError` with a one-line message naming the
file and what is wrong; nothing of a finished epoch is ever dropped silently.
"""

import contextlib
import dataclasses
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

from invp_tf import config as config_lib
from invp_tf import model as model_lib

FLAGS_FILE = "flags.txt"
HISTORY_FILE = "flags_history.txt"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
DATASET_FILE = "dataset.json.gz"
LOCK_FILE = "train.lock"
# The named parts of a training checkpoint. Training saves exactly these objects
# (`training_checkpoint`); every reader finds a part by its name in the checkpoint's object
# graph (`checkpoint_parts`), never by matching the strings of variable keys.
CHECKPOINT_PARTS = ("encoder", "optimizer", "bank", "graph", "epoch", "step")


class WorkdirError(ValueError):
    """A run directory problem, in one line naming the file and what to do.

    A ValueError, so every entry point's one-line error handler reports it.
    """


class NonFiniteError(ValueError):
    """Variables holding inf or NaN (a training that diverged); the message names them."""

    def __init__(self, names):
        more = f" and {len(names) - 1} more variables" if len(names) > 1 else ""
        super().__init__(f"inf or NaN in {names[0]}{more}")
        self.names = names


def reason(error):
    """The short cause of an I/O error: 'No space left on device', 'File too large'..."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\s*\[Op:\w+\]\s*$", "", " ".join(message.split()))
    return message.rsplit("; ", 1)[-1][:200]


@contextlib.contextmanager
def writing(path, what):
    """Turns an I/O error while writing `what` to `path` into one WorkdirError line."""
    try:
        yield
    except (OSError, tf.errors.OpError) as e:
        raise WorkdirError(f"could not write {what} {path}: {reason(e)}") from e


def write_atomically(path, text, what="file"):
    """Writes `text` to `path` (local or gs:// etc.) through a temporary file and a rename, so
    that a reader never sees half of it; an I/O error becomes one WorkdirError line."""
    temporary = f"{path}.{os.getpid()}.tmp"  # two writers never share a temporary file
    with writing(path, what):
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(text)
        tf.io.gfile.rename(temporary, path, overwrite=True)


def is_local(path):
    return "://" not in path


# ---------------------------------------------------------------------------
# flags.txt and its history.


def read_flags(workdir):
    """The Config of flags.txt in `workdir`; None when there is none."""
    path = os.path.join(workdir, FLAGS_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        return config_lib.Config.from_flagfile(path)
    except ValueError as e:
        raise WorkdirError(f"{path} is unreadable: {e}") from e


# ---------------------------------------------------------------------------
# Checkpoints.


def _all_finite(value, rows=1 << 16):
    """Whether every element of the variable `value` is finite, read on its device (a large
    matrix, the bank, in chunks of rows: is_finite's boolean copy stays small)."""
    if len(value.shape) < 2 or int(tf.size(value)) <= 1 << 24:
        return bool(tf.reduce_all(tf.math.is_finite(value)))
    return all(
        bool(tf.reduce_all(tf.math.is_finite(value[start : start + rows])))
        for start in range(0, int(tf.shape(value)[0]), rows)
    )


def nonfinite_variables(variables):
    """Names ("encoder/backbone/stem_bn/moving_variance") of the float variables among
    `variables` that hold inf or NaN, in their order."""
    return [
        getattr(v, "path", None) or v.name.removesuffix(":0")
        for v in variables
        if tf.as_dtype(v.dtype).is_floating and not _all_finite(v)
    ]


def nonfinite_tensors(path):
    """Names of the float tensors of the checkpoint at `path` that hold inf or NaN, read back
    from its files (each tensor once)."""
    reader = tf.train.load_checkpoint(path)
    return [
        key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
        for key, dtype in sorted(reader.get_variable_to_dtype_map().items())
        if dtype.is_floating and not np.isfinite(reader.get_tensor(key)).all()
    ]


def _checkpoint_state_ok(checkpoint_dir, newest):
    try:
        state = tf.train.get_checkpoint_state(checkpoint_dir)
    except Exception:  # noqa: BLE001 (any parse error means the same: unreadable)
        return False
    if state is None or not state.model_checkpoint_path:
        return False
    # The newest checkpoint on disk, or CheckpointManager (and the preemption handler, which
    # restores its latest checkpoint) would read another one than the run resumes from.
    return os.path.basename(state.model_checkpoint_path) == os.path.basename(newest)


def training_checkpoint(**parts):
    """A `tf.train.Checkpoint` of a run's named parts (keywords from CHECKPOINT_PARTS).

    Training passes all of them; a reader passes the ones it restores (a checkpoint written
    before steps were counted apart has no `step`).
    """
    unknown = sorted(set(parts) - set(CHECKPOINT_PARTS))
    if unknown:
        raise ValueError(f"not parts of a training checkpoint: {unknown} ({CHECKPOINT_PARTS})")
    return tf.train.Checkpoint(**parts)


def checkpoint_parts(reader):
    """{part: [checkpoint keys of its variables]} of the CHECKPOINT_PARTS a checkpoint holds.

    reader: `tf.train.load_checkpoint(path)`. Read from the checkpoint's object graph: a
    part's variables are the objects below the root's child of that name, however their
    keys are spelled.
    """
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    parts = {}
    for child in graph.nodes[0].children:
        if child.local_name not in CHECKPOINT_PARTS:
            continue
        seen, todo = {child.node_id}, [child.node_id]
        while todo:
            for below in graph.nodes[todo.pop()].children:
                if below.node_id not in seen:
                    seen.add(below.node_id)
                    todo.append(below.node_id)
        parts[child.local_name] = [
            attribute.checkpoint_key
            for node in sorted(seen)
            for attribute in graph.nodes[node].attributes
            if attribute.name == "VARIABLE_VALUE"
        ]
    return parts


def read_part(reader, parts, name):
    """The value of the one-variable part `name` (bank, graph, epoch, step); None if absent."""
    keys = parts.get(name)
    return reader.get_tensor(keys[0]) if keys else None


def read_counter(reader, name):
    """The counter part `name` ("epoch" or "step") as an int; None when the checkpoint has none.

    The counters are variables at the checkpoint's root, so their key follows from the part
    name alone: read without the object graph, whose tensor a truncated data file may have
    lost (the checkpoint is still ordered by its progress, and its restore names the error).
    """
    key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


def _progress(path):
    """(step, epoch) stored in the checkpoint at `path`; None when it cannot be read."""
    try:
        reader = tf.train.load_checkpoint(path)
        values = [read_counter(reader, name) for name in ("step", "epoch")]
        return tuple(-1 if value is None else value for value in values)
    except Exception:  # noqa: BLE001 (unreadable: ordered last, its restore names the error)
        return None


def checkpoint_epoch(path):
    """Epochs finished in the checkpoint at `path`; None when it cannot be read.

    Reads the file without running a TF op, so a multi-worker strategy created afterwards can
    still configure its collectives (they must precede the first op); only where the reader
    cannot open it (TF's ram://, where any path prefix is a folder) a restore reads it.
    """
    try:
        return read_counter(tf.train.load_checkpoint(path), "epoch")
    except ValueError:
        epoch = tf.Variable(0, dtype=tf.int64)
        try:
            training_checkpoint(epoch=epoch).restore(path).expect_partial()
        except (tf.errors.OpError, ValueError):
            return None
        return int(epoch.numpy())
    except tf.errors.OpError:  # unreadable: training's restore reports it
        return None


def checkpoint_paths(workdir):
    """The checkpoints on disk in `workdir/checkpoints`, newest (most steps trained) first.

    Read from the files, not the `checkpoint` state file, so a lost or garbled state file
    loses nothing. Preemption checkpoints are numbered by step, epoch checkpoints by epoch:
    the order comes from the step counter stored in each.
    """
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
    paths = []
    for index in tf.io.gfile.glob(os.path.join(checkpoint_dir, "ckpt-*.index")):
        path = index[: -len(".index")]
        if re.fullmatch(r"ckpt-\d+", os.path.basename(path)):
            paths.append(path)
    number = lambda p: int(p.rsplit("-", 1)[1])  # noqa: E731
    progress = {p: _progress(p) for p in paths}
    return sorted(paths, key=lambda p: (progress[p] is not None, progress[p], number(p)))[::-1]


def repair_checkpoint_state(workdir):
    """Rewrites a missing, garbled or stale `checkpoints/checkpoint` from the checkpoint files.

    CheckpointManager reads that file to find the latest checkpoint and the ones to rotate;
    without this, a lost file would silently restart the run from scratch. Stale: it names
    another checkpoint than the newest on disk (a crash between a save and its state update).
    """
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
    paths = checkpoint_paths(workdir)
    if not paths or _checkpoint_state_ok(checkpoint_dir, paths[0]):
        return
    state_file = os.path.join(checkpoint_dir, "checkpoint")
    problem = "missing"
    if tf.io.gfile.exists(state_file):
        problem = "garbled or stale"
    logging.warning(
        "%s is %s; rebuilt it from the checkpoint files (newest: %s).",
        state_file,
        problem,
        os.path.basename(paths[0]),
    )
    with writing(state_file, "the checkpoint state file"):
        tf.compat.v1.train.update_checkpoint_state(
            checkpoint_dir,
            os.path.basename(paths[0]),
            all_model_checkpoint_paths=[os.path.basename(p) for p in reversed(paths)],
        )


def restore_newest(workdir, restore, checkpoint=None, set_aside=False):
    """Restores the newest readable checkpoint of `workdir` with `restore(path)`.

    A checkpoint that fails (truncated, checksum, unreadable index) or holds inf or NaN (the
    training diverged: `restore` raises NonFiniteError) is named in a warning and the next
    older one is tried, so a corrupt latest file costs the epochs since the previous one,
    never the run.

    Args:
      workdir: the run folder.
      restore: callable(path) that restores every variable or raises.
      checkpoint: a checkpoint to use instead ("ckpt-3" or a path); no fallback then.
      set_aside: move the checkpoints that failed to `checkpoints/corrupt/` (training's
        chief: the run continues from the one restored and must not meet them again).

    Returns:
      The path restored; None when the run has no checkpoint yet.

    Raises:
      WorkdirError: `checkpoint` or every checkpoint failed; names each with its error (or
        the variables holding inf or NaN).
    """
    if checkpoint:
        path = checkpoint
        if not tf.io.gfile.exists(path + ".index"):
            path = os.path.join(workdir, CHECKPOINT_DIR, checkpoint)
        if not tf.io.gfile.exists(path + ".index"):
            raise WorkdirError(f"--checkpoint={checkpoint}: no such checkpoint ({path}.index)")
        candidates = [path]
    else:
        candidates = checkpoint_paths(workdir)
    failures, nonfinite = [], []
    for path in candidates:
        try:
            restore(path)
        except WorkdirError:
            raise  # not a damaged file: the checkpoint does not fit the run's flags
        except NonFiniteError as e:
            nonfinite.append(path)
            reason = f"it holds {e}"
            failures.append(f"{os.path.basename(path)} ({e})")
        except Exception as e:  # noqa: BLE001 (any failure: try the previous checkpoint)
            reason = " ".join(str(e).split())[:200]
            failures.append(f"{os.path.basename(path)} ({type(e).__name__}: {reason})")
        else:
            if failures:
                logging.warning(
                    "Restored %s; newer checkpoint(s) it skipped: %s.", path, "; ".join(failures)
                )
            if failures and set_aside:
                _set_aside(workdir, candidates[: candidates.index(path)], nonfinite)
            return path
        if path != candidates[-1]:
            logging.warning("Cannot restore %s: %s; trying an older checkpoint.", path, reason)
    if failures and len(nonfinite) == len(failures):
        raise WorkdirError(
            f"no checkpoint of {workdir} is finite: {'; '.join(failures)}; the training "
            "diverged before it was saved: train into a new --workdir with a lower "
            "--learning_rate"
        )
    if failures:
        raise WorkdirError(
            f"no checkpoint of {workdir} can be restored: {'; '.join(failures)}; restore the "
            "files from a backup or start a new --workdir"
        )
    return None


def _set_aside(workdir, paths, nonfinite):
    corrupt = os.path.join(workdir, CHECKPOINT_DIR, "corrupt")
    with writing(corrupt, "the unreadable checkpoints to"):
        tf.io.gfile.makedirs(corrupt)
        for path in paths:
            for name in tf.io.gfile.glob(path + ".*"):
                tf.io.gfile.rename(
                    name, os.path.join(corrupt, os.path.basename(name)), overwrite=True
                )
            what = "non-finite" if path in nonfinite else "unreadable"
            logging.warning("Moved the %s %s to %s.", what, os.path.basename(path), corrupt)
    repair_checkpoint_state(workdir)


# ---------------------------------------------------------------------------
# metrics.jsonl.


def read_metrics(workdir):
    """The rows of metrics.jsonl ([] when absent).

    A torn last line (a crash during the append: no newline at its end) is dropped with a
    warning, its epoch has no checkpoint and reruns. Any other unreadable line raises
    WorkdirError with the file and line number.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a metrics row with an integer 'epoch'")
        except ValueError as e:
            if number == len(lines):  # the last line, without its newline: torn
                logging.warning(
                    "%s line %d is incomplete (a crash while it was written); dropped, its "
                    "epoch reruns.",
                    path,
                    number,
                )
                break
            raise WorkdirError(
                f"{path} line {number} is unreadable ({e}); fix or delete that line and rerun"
            ) from e
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Reading a run.


@dataclasses.dataclass
class Run:
    """A finished or running training run, restored from its work directory."""

    config: config_lib.Config
    encoder: keras.Model
    bank: np.ndarray  # [N, D] memory bank
    knn_graph: np.ndarray  # [N, k] int32, the graph of the last epoch that used L_inv
    epoch: int  # epochs completed
    checkpoint: str = ""  # the checkpoint restored


def load_run(workdir, checkpoint=None):
    """Restores encoder, bank and graph of the newest readable checkpoint in `workdir`.

    The checkpoint must match flags.txt: every encoder variable restored with its shape, and
    the bank's width the --embedding_dim, every value of encoder and bank finite. A corrupt or
    non-finite newest checkpoint falls back to the previous one with a warning; `checkpoint`
    ("ckpt-2" or a path) picks one.

    Raises:
      FileNotFoundError: no flags.txt or no checkpoint in `workdir`.
      WorkdirError: no checkpoint can be restored (or none is finite), or it does not match
        flags.txt.
    """
    flagfile = os.path.join(workdir, FLAGS_FILE)
    if not tf.io.gfile.exists(flagfile):
        raise FileNotFoundError(f"{workdir} is not a training run: no flags.txt")
    if not checkpoint and not checkpoint_paths(workdir):
        raise FileNotFoundError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
    config = read_flags(workdir)
    encoder = model_lib.encoder_from_config(config)
    epoch = tf.Variable(0, dtype=tf.int64)
    loaded = {}

    def restore(path):
        reader = tf.train.load_checkpoint(path)
        parts = checkpoint_parts(reader)
        if not parts.get("bank") or not parts.get("graph"):
            raise WorkdirError(f"{path} is not an invp_tf training checkpoint (no bank or graph)")
        width = reader.get_variable_to_shape_map()[parts["bank"][0]][-1]
        if width != config.embedding_dim:
            raise WorkdirError(
                f"{path} does not match {flagfile}: its bank has width {width}, "
                f"not --embedding_dim={config.embedding_dim}"
            )
        saved = len(parts.get("encoder", ()))
        if saved != len(encoder.weights):  # e.g. an mlp head's checkpoint read as linear
            raise WorkdirError(
                f"{path} does not match {flagfile} (--encoder={config.encoder} "
                f"--head={config.head} --width_multiplier={config.width_multiplier}): its "
                f"encoder has {saved} variables, these flags build {len(encoder.weights)}"
            )
        try:
            status = training_checkpoint(encoder=encoder, epoch=epoch).restore(path)
            status.expect_partial().assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:  # missing variables, other shapes
            raise WorkdirError(
                f"{path} does not match {flagfile} (--encoder={config.encoder} "
                f"--head={config.head} --width_multiplier={config.width_multiplier}): "
                f"{' '.join(str(e).split())[:200]}"
            ) from e
        loaded.update(
            bank=read_part(reader, parts, "bank"), graph=read_part(reader, parts, "graph")
        )
        # A diverged training's checkpoint (older versions saved them) gives NaN embeddings.
        bad = nonfinite_variables(encoder.weights)
        bad += [] if np.isfinite(loaded["bank"]).all() else ["memory_bank/bank"]
        if bad:
            raise NonFiniteError(bad)

    path = restore_newest(workdir, restore, checkpoint)
    return Run(config, encoder, loaded["bank"], loaded["graph"], int(epoch), path)


def check_output(flag, path, kind="folder"):
    """Raises WorkdirError when --`flag`=`path` cannot be written as a `kind` ("folder" or
    "file"); writes nothing.

    Called by every command before it reads any data or model, so a bad path costs one line
    and no work: a path of the other kind, a file where a folder above it would be, or a
    folder it would be written in (or created in) without write permission. Paths with a
    scheme (gs://...) are left to their first write. An empty path is not checked.
    """
    if not path or "://" in path:
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and os.path.isdir(full) != (kind == "folder"):
        other = "a file" if kind == "folder" else "a folder"
        raise WorkdirError(f"--{flag}={path} is {other}, not a {kind}")
    existing = full if kind == "folder" else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--{flag}={path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == full else f"cannot be created in {existing}"
        raise WorkdirError(f"--{flag}={path} {what} (permission denied)")
