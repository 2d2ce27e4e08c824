"""A run's work directory, owned here: flags and their history, checkpoints, metrics, lock.

`train` writes runs; the analysis, evaluation and export entry points read them
through `load_run`, so none of them has to import train's flags.

What lives in `--workdir` (names below):
  - flags.txt: the run's flags (rewritten only after a successful restore);
  - flags_history.txt: one appended line per start and per accepted flag change;
  - checkpoints/: `ckpt-N` of `tf.train.CheckpointManager` (parts in CHECKPOINT_PARTS);
  - metrics.jsonl: one JSON row per finished epoch;
  - train.lock: the pid and host of the training that writes the run.

Every problem a user can meet here is a `WorkdirError` with a one-line message naming the
file and what is wrong; nothing of a finished epoch is ever dropped silently.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import re
import socket

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

from invp_tf import config as config_lib
from invp_tf import encoder as encoder_lib

FLAGS_FILE = "flags.txt"
HISTORY_FILE = "flags_history.txt"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"
# The named parts of a training checkpoint. Training saves exactly these objects
# (`training_checkpoint`); every reader finds a part by its name in the checkpoint's object
# graph (`checkpoint_parts`), never by matching the strings of variable keys.
CHECKPOINT_PARTS = ("encoder", "optimizer", "bank", "graph", "epoch", "step")

# Flags a rerun may change, with why; any other difference stops the rerun before anything is
# written (it would change the model, the data, the bank or the optimizer state, so the
# checkpoint could not continue the same run).
SAFE_TO_CHANGE = {
    "workdir": "the same folder, spelled another way",
    "epochs": "extends (or ends) the run; a cosine or warm-up schedule is stretched to it",
    "eval_every": "when the kNN monitor runs; training does not read it",
    "knn_k": "kNN monitor only",
    "knn_temperature": "kNN monitor only",
    "knn_features": "kNN monitor only",
    "strategy": "where the same computation runs; results match up to summation order",
    "tpu": "where the same computation runs",
    "cpu_devices": "where the same computation runs",
    "jit_compile": "XLA compiles the same step; results match up to round-off",
    "device_memory_gb": "only checks the memory plan before the first step",
    "dry_run": "prints the memory plan; trains nothing",
}


class WorkdirError(ValueError):
    """A run directory problem, in one line naming the file and what to do.

    A ValueError, so every entry point's one-line error handler reports it.
    """


def _reason(error):
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
        raise WorkdirError(f"could not write {what} {path}: {_reason(e)}") from e


def _write_atomically(path, text, what):
    with writing(path, what):
        with tf.io.gfile.GFile(path + ".tmp", "w") as f:
            f.write(text)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


# ---------------------------------------------------------------------------
# The directory itself.


def _is_local(path):
    return "://" not in path


def check_workdir(workdir):
    """Raises WorkdirError when `workdir` cannot hold a run (a file, unwritable); writes nothing."""
    if not workdir:
        raise WorkdirError("--workdir is required")
    if not _is_local(workdir):
        return  # gs:// and the like: their errors come with the first write
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--workdir={workdir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise WorkdirError(f"--workdir={workdir} {what} (permission denied)")


def prepare(workdir):
    """Creates `workdir` and removes leftovers of crashed saves (chief, under the lock)."""
    with writing(workdir, "the run folder"):
        tf.io.gfile.makedirs(os.path.join(workdir, CHECKPOINT_DIR))
    for stale in tf.io.gfile.glob(os.path.join(workdir, CHECKPOINT_DIR, "*_temp*")):
        # A save that died midway (crash, full disk): CheckpointManager never reuses it.
        logging.warning("Removing %s, left by a checkpoint save that did not finish.", stale)
        with writing(stale, "(removing) the partial checkpoint"):
            if tf.io.gfile.isdir(stale):
                tf.io.gfile.rmtree(stale)
            else:
                tf.io.gfile.remove(stale)


# ---------------------------------------------------------------------------
# One writer per run.


def _process_start(pid):
    """The start time of process `pid` (Linux clock ticks), '' when unknown, None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def _read_lock(path):
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except (tf.errors.NotFoundError, FileNotFoundError):
        return None
    except (ValueError, OSError, tf.errors.OpError):
        return {}  # torn by a crash while it was written


@contextlib.contextmanager
def lock(workdir):
    """Holds `workdir/train.lock` (pid, host) while the block runs; one training per run.

    A lock of a process that is gone (same host, pid not running, or running since another
    time) is taken over with a warning; a live holder stops this training with its pid and host.
    """
    with writing(workdir, "the run folder"):
        tf.io.gfile.makedirs(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    pid, host = os.getpid(), socket.gethostname()
    record = {"pid": pid, "host": host, "start": _process_start(pid) or ""}
    text = json.dumps(record) + "\n"
    for _ in range(3):
        if _is_local(path):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            except OSError as e:
                raise WorkdirError(f"could not write the lock file {path}: {_reason(e)}") from e
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                break
        elif not tf.io.gfile.exists(path):  # no exclusive create on object stores
            with writing(path, "the lock file"):
                with tf.io.gfile.GFile(path, "w") as f:
                    f.write(text)
            break
        holder = _read_lock(path)
        if holder is None:
            continue  # released meanwhile
        start = holder.get("start")
        alive = None
        if holder.get("host") == host and isinstance(holder.get("pid"), int):
            now = _process_start(holder["pid"])
            alive = now is not None and (not start or not now or now == start)
        if alive is None and holder:
            raise WorkdirError(
                f"{workdir} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                f"({path}); wait for that training to end, or delete the lock file if it is "
                "gone"
            )
        if alive:
            raise WorkdirError(
                f"{workdir} is in use by another training: pid {holder['pid']} on host {host} "
                f"({path}); wait for it to end or stop it, or train into another --workdir"
            )
        logging.warning(
            "Taking over %s: its process (pid %s on %s) is gone.",
            path,
            holder.get("pid"),
            holder.get("host"),
        )
        with contextlib.suppress(tf.errors.NotFoundError, FileNotFoundError):
            tf.io.gfile.remove(path)
    else:
        raise WorkdirError(f"could not take the lock file {path}; rerun the same command")
    try:
        yield path
    finally:
        with contextlib.suppress(tf.errors.OpError, OSError):
            if (_read_lock(path) or {}).get("pid") == pid:
                tf.io.gfile.remove(path)


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


def _flag(config, name):
    value = getattr(config, name)
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def flag_changes(workdir, config):
    """Names of the flags of `config` that differ from the run's flags.txt; [] for a new run.

    Raises:
      WorkdirError: a flag outside SAFE_TO_CHANGE differs and the run has a checkpoint, listing
        every such flag with the run's value. Nothing is written.
    """
    saved = read_flags(workdir)
    if saved is None:
        return []
    changed = [
        field.name
        for field in dataclasses.fields(config_lib.Config)
        if field.name != "workdir" and getattr(saved, field.name) != getattr(config, field.name)
    ]
    refused = [name for name in changed if name not in SAFE_TO_CHANGE]
    if refused and checkpoint_paths(workdir):
        given = " ".join(_flag(config, name) for name in refused)
        theirs = " ".join(_flag(saved, name) for name in refused)
        safe = ", ".join(f"--{name}" for name in SAFE_TO_CHANGE if name != "workdir")
        verb = "differs" if len(refused) == 1 else "differ"
        raise WorkdirError(
            f"{given} {verb} from the run in {workdir} ({theirs} in {FLAGS_FILE}): a checkpoint "
            f"cannot continue with another model, data, bank or optimizer; rerun with the run's "
            f"values or use a new --workdir (a rerun may change only {safe})"
        )
    return changed


def _history(workdir, line):
    path = os.path.join(workdir, HISTORY_FILE)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with writing(path, "the flag history"):
        with tf.io.gfile.GFile(path, "a") as f:
            f.write(f"{stamp} {line}\n")


def write_flags(workdir, config, changed=(), epoch=0, previous=None):
    """Writes flags.txt (atomically) and appends what changed to flags_history.txt.

    Call it for a new run before training, and for a resumed run only after its checkpoint
    restored: a rerun that fails before never alters the run's record.
    """
    config = dataclasses.replace(config, workdir=workdir)
    path = os.path.join(workdir, FLAGS_FILE)
    if previous is None:
        _write_atomically(path, "\n".join(config.flagfile_lines()) + "\n", "the run's flags")
        _history(workdir, f"new run: {' '.join(config.flagfile_lines())}")
        return
    changed = [name for name in changed if name != "workdir"]
    if not changed:
        return
    _write_atomically(path, "\n".join(config.flagfile_lines()) + "\n", "the run's flags")
    what = ", ".join(f"{_flag(config, n)} (was {_flag(previous, n)})" for n in changed)
    _history(workdir, f"resumed after epoch {epoch} with {what}")


# ---------------------------------------------------------------------------
# Checkpoints.


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

    A checkpoint that fails (truncated, checksum, unreadable index) is named in a warning and
    the next older one is tried, so a corrupt latest file costs the epochs since the previous
    one, never the run.

    Args:
      workdir: the run folder.
      restore: callable(path) that restores every variable or raises.
      checkpoint: a checkpoint to use instead ("ckpt-3" or a path); no fallback then.
      set_aside: move the checkpoints that failed to `checkpoints/corrupt/` (training's
        chief: the run continues from the one restored and must not meet them again).

    Returns:
      The path restored; None when the run has no checkpoint yet.

    Raises:
      WorkdirError: `checkpoint` or every checkpoint failed; names each with its error.
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
    failures = []
    for path in candidates:
        try:
            restore(path)
        except WorkdirError:
            raise  # not a damaged file: the checkpoint does not fit the run's flags
        except Exception as e:  # noqa: BLE001 (any failure: try the previous checkpoint)
            reason = " ".join(str(e).split())[:200]
            failures.append(f"{os.path.basename(path)} ({type(e).__name__}: {reason})")
            if path != candidates[-1]:
                logging.warning("Cannot restore %s: %s; trying an older checkpoint.", path, reason)
            continue
        if failures:
            logging.warning(
                "Restored %s; unreadable newer checkpoint(s): %s.", path, "; ".join(failures)
            )
        if failures and set_aside:
            _set_aside(workdir, candidates[: candidates.index(path)])
        return path
    if failures:
        raise WorkdirError(
            f"no checkpoint of {workdir} can be restored: {'; '.join(failures)}; restore the "
            "files from a backup or start a new --workdir"
        )
    return None


def _set_aside(workdir, paths):
    corrupt = os.path.join(workdir, CHECKPOINT_DIR, "corrupt")
    with writing(corrupt, "the unreadable checkpoints to"):
        tf.io.gfile.makedirs(corrupt)
        for path in paths:
            for name in tf.io.gfile.glob(path + ".*"):
                tf.io.gfile.rename(
                    name, os.path.join(corrupt, os.path.basename(name)), overwrite=True
                )
            logging.warning("Moved the unreadable %s to %s.", os.path.basename(path), corrupt)
    repair_checkpoint_state(workdir)


def save_checkpoint(manager, number):
    """manager.save(number); a failed write (full disk) removes its partial files and says so."""
    path = os.path.join(manager.directory, f"ckpt-{number}")
    previous = manager.latest_checkpoint
    try:
        return manager.save(checkpoint_number=number)
    except (OSError, tf.errors.OpError) as e:
        for partial in tf.io.gfile.glob(path + "_temp*") + tf.io.gfile.glob(path + ".*"):
            with contextlib.suppress(tf.errors.OpError, OSError):
                if tf.io.gfile.isdir(partial):
                    tf.io.gfile.rmtree(partial)
                else:
                    tf.io.gfile.remove(partial)
        kept = f"the last good checkpoint {previous} is intact" if previous else "no checkpoint yet"
        raise WorkdirError(
            f"could not write checkpoint {path}: {_reason(e)}; {kept}; free space and rerun the "
            "same command"
        ) from e


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


def truncate_metrics(workdir, first_epoch):
    """Keeps the rows of epochs < first_epoch (later ones were written before a crash)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return
    rows = [row for row in read_metrics(workdir) if row["epoch"] < first_epoch]
    _write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows), "the metrics")


def append_metrics(workdir, row):
    path = os.path.join(workdir, METRICS_FILE)
    with writing(path, f"the metrics row of epoch {row['epoch']} to"):
        with tf.io.gfile.GFile(path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------
# Reading a run.


def encoder_from_config(config, sync_batchnorm=False):
    """The run's encoder, variables built (weights still to be restored).

    sync_batchnorm: global-batch BatchNorm statistics (training under several
    replicas); inference, evaluation and export never need it.
    """
    return encoder_lib.build_encoder(
        config.encoder,
        head=config.head,
        embedding_dim=config.embedding_dim,
        width_multiplier=config.width_multiplier,
        sync_batchnorm=sync_batchnorm,
        image_size=config.image_size,
    )


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
    the bank's width the --embedding_dim. A corrupt newest checkpoint falls back to the
    previous one with a warning; `checkpoint` ("ckpt-2" or a path) picks one.

    Raises:
      FileNotFoundError: no flags.txt or no checkpoint in `workdir`.
      WorkdirError: no checkpoint can be restored, or it does not match flags.txt.
    """
    flagfile = os.path.join(workdir, FLAGS_FILE)
    if not tf.io.gfile.exists(flagfile):
        raise FileNotFoundError(f"{workdir} is not a training run: no flags.txt")
    if not checkpoint and not checkpoint_paths(workdir):
        raise FileNotFoundError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
    config = read_flags(workdir)
    encoder = encoder_from_config(config)
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

    path = restore_newest(workdir, restore, checkpoint)
    return Run(config, encoder, loaded["bank"], loaded["graph"], int(epoch), path)
