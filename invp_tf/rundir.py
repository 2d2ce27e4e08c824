"""RunDir: the run folder of one training, as one object.

Training speaks to its --workdir through a RunDir alone, in a handful of calls:

    RunDir.check(workdir)                # before anything else: can it hold a run?
    run_dir = RunDir.open(config, workdir, chief, dataset)  # lock, identity, repair, flags
    run_dir.restore(strategy, **parts)   # the newest readable finite checkpoint, if any
    run_dir.append(row); run_dir.save(epoch)  # every epoch: metrics row, then checkpoint
    run_dir.close()                      # the lock released (or `with RunDir.open`)

The run's identity (its flags and its training data's fingerprint) travels inside every
checkpoint it saves (`identity`); a rerun is checked against the newest one, flags.txt being
its readable copy. Every checkpoint saved holds finite values only. The files' formats and
the readers that evaluation, export and analysis use are `workdir` (flags.txt, checkpoints
and their named parts, metrics.jsonl). Workers other than the chief take no lock and write
only scratch checkpoints, which they delete again.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import socket

import keras
import tensorflow as tf
from absl import logging

from invp_tf import config as config_lib
from invp_tf import distribute
from invp_tf import identity
from invp_tf import workdir as workdir_lib

# Flags a rerun may change (Config fields marked safe_to_change), with why; any other
# difference stops the rerun before anything is written (it would change the model, the
# data, the bank or the optimizer state, so the checkpoint could not continue the same run).
SAFE_TO_CHANGE = {
    field.name: field.metadata["safe_to_change"]
    for field in dataclasses.fields(config_lib.Config)
    if "safe_to_change" in field.metadata
}
# The flags that define the run: the ones its checkpoints must be continued with.
_DEFINING = [
    field.name
    for field in dataclasses.fields(config_lib.Config)
    if field.name not in SAFE_TO_CHANGE
]


class RunDir:
    """The run folder of one training (module docstring): opened, restored, appended, saved.

    Attributes:
      path: the folder (--workdir).
      manager: the CheckpointManager of the chief's checkpoints (after `restore`), which
        every worker reads (the preemption handler too).
      writer: the chief's TensorBoard writer (after `restore`); None on other workers.
    """

    def __init__(self, path, config, chief):
        self.path, self.config, self.chief = path, config, chief
        self.manager = self.writer = None
        self._changed, self._previous = [], None
        self._write_manager = None
        self._parts, self._dataset, self._record = {}, None, None
        self._exit = contextlib.ExitStack()

    @staticmethod
    def check(workdir):
        """Raises WorkdirError when `workdir` cannot hold a run (a file, unwritable); writes
        nothing."""
        if not workdir:
            raise workdir_lib.WorkdirError("--workdir is required")
        workdir_lib.check_output("workdir", workdir)

    @classmethod
    def open(cls, config, workdir, chief=True, dataset=None):
        """Takes the run's lock (chief), checks a rerun against the run's identity (the record
        in its newest checkpoint; flags.txt for checkpoints written before they carried one),
        removes partial saves and repairs the checkpoint state and a lost or edited flags.txt
        (chief), and writes a new run's flags and its folder data's listing.

        Args:
          config: the run's config.Config.
          workdir: the run folder.
          chief: whether this process writes the run (takes the lock, repairs, writes).
          dataset: the training data (a data.Source), checked against the record and recorded
            in each checkpoint; None where it is not known (an imported checkpoint).

        Raises:
          WorkdirError: the run is in use, a flag outside SAFE_TO_CHANGE differs from a run
            with a checkpoint, or the training data differs from the checkpoint's; nothing is
            written then.
        """
        run_dir = cls(workdir, config, chief)
        try:
            if chief:  # one training per run; a second one stops here naming the first
                run_dir._exit.enter_context(_lock(workdir))
            record = identity.read(workdir)
            saved = workdir_lib.read_flags(workdir)
            run_dir._previous = _run_flags(workdir, config, saved, record)
            run_dir._changed = _changes(run_dir._previous, config)
            files = None
            if dataset is not None:
                run_dir._dataset = identity.dataset_record(dataset)
                files = identity.listing(dataset)
                if record is not None:
                    identity.check_dataset(workdir, record, run_dir._dataset, files)
            if chief:
                _prepare(workdir)  # removes partial saves of earlier crashes
                workdir_lib.repair_checkpoint_state(workdir)
                if not workdir_lib.checkpoint_paths(workdir):  # a new run (or no checkpoint yet)
                    _write_flags(workdir, config)
                elif record is not None and run_dir._previous != saved:
                    _restore_flags(workdir, run_dir._previous, saved, record)
                if files is not None:
                    identity.keep_listing(workdir, run_dir._dataset, files)
        except BaseException:
            run_dir.close()
            raise
        return run_dir

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def restore(self, strategy, **parts):
        """Restores the newest readable checkpoint holding finite values only into `parts`
        (every name of workdir.CHECKPOINT_PARTS; a corrupt or non-finite checkpoint is named
        and set aside), records a rerun's flag changes once the state is back, and readies the
        checkpoint saves, metrics.jsonl (rows of epochs not in the checkpoint dropped) and
        TensorBoard.

        Returns:
          The path restored; None for a new run.
        """
        restoring = workdir_lib.training_checkpoint(**parts)

        def restore(path):
            if workdir_lib.read_counter(tf.train.load_checkpoint(path), "step") is not None:
                restoring.restore(path).assert_existing_objects_matched()
            else:  # written before steps were counted apart: every step was applied then
                older = {name: part for name, part in parts.items() if name != "step"}
                workdir_lib.training_checkpoint(**older).restore(
                    path
                ).assert_existing_objects_matched()
                parts["step"].assign(parts["optimizer"].iterations)
            bad = workdir_lib.nonfinite_variables(_variables(parts))
            if bad:  # a diverged training's state (older versions saved such checkpoints)
                raise workdir_lib.NonFiniteError(bad)

        # Before the managers read the checkpoint list.
        path = workdir_lib.restore_newest(self.path, restore, set_aside=self.chief)
        epoch = int(parts["epoch"].numpy())
        if path and self.chief:  # the run's record changes only once its state is back
            _write_flags(self.path, self.config, self._changed, epoch, self._previous)
        # CheckpointManager writes the data files first and then replaces the small
        # `checkpoint` index file, so a crash mid-save leaves the previous one valid. Every
        # worker reads the chief's checkpoints; the others write scratch copies. Saves carry
        # the run's identity record beside the parts (restores read it apart: `identity`).
        checkpoint_dir = os.path.join(self.path, workdir_lib.CHECKPOINT_DIR)
        self._parts, self._record = parts, identity.variable()
        checkpoint = tf.train.Checkpoint(**parts, **{identity.NAME: self._record})
        self.manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=3)
        self._write_manager = self.manager
        if not self.chief:
            scratch = distribute.checkpoint_directory(strategy, checkpoint_dir)
            self._write_manager = tf.train.CheckpointManager(checkpoint, scratch, max_to_keep=1)
        if self.chief:
            _truncate_metrics(self.path, epoch)
            self.writer = tf.summary.create_file_writer(os.path.join(self.path, "tensorboard"))
        return path

    def save(self, number):
        """Writes checkpoint ckpt-`number` (other workers: a scratch copy) with the run's
        identity record; returns its path.

        Raises:
          NonFiniteError: a variable holds inf or NaN; nothing is written.
        """
        bad = self.nonfinite()
        if bad:
            raise workdir_lib.NonFiniteError(bad)
        self._record.assign(identity.record_text(self.config, self._dataset))
        path = _save_checkpoint(self._write_manager, number)
        if not self.chief:
            tf.io.gfile.rmtree(self._write_manager.directory)
        return path

    def nonfinite(self):
        """Names of the variables of the restored parts that hold inf or NaN."""
        return workdir_lib.nonfinite_variables(_variables(self._parts))

    def last_good(self):
        """The newest checkpoint on disk that reads back whole with finite values only; None
        when there is none."""
        for path in workdir_lib.checkpoint_paths(self.path):
            try:
                if not workdir_lib.nonfinite_tensors(path):
                    return path
            except Exception:  # noqa: BLE001 (unreadable: not a good one)
                continue
        return None

    def append(self, row):
        """Appends an epoch's row to metrics.jsonl and its numbers to TensorBoard (chief)."""
        if not self.chief:
            return
        _append_metrics(self.path, row)
        with self.writer.as_default(step=row["epoch"] + 1):
            for name, value in row.items():
                if name != "epoch" and value is not None:
                    tf.summary.scalar(name, value)

    def step_summaries(self, steps, every):
        """A Keras callback writing each `every`-th step's loss and learning rate to
        TensorBoard at the global step (`steps`, the model's step counter); chief only."""
        return _StepSummaries(self.writer, steps, every)

    def close(self):
        """Releases the run's lock (the chief's); safe to call twice."""
        self._exit.close()


class _StepSummaries(keras.callbacks.Callback):
    """TensorBoard scalars of the step every `every` steps: `step/loss` (that step's loss, not
    the epoch's running mean) and `step/learning_rate`, at the global step."""

    def __init__(self, writer, steps, every):
        super().__init__()
        self.writer, self.steps, self.every = writer, steps, every

    def on_train_begin(self, logs=None):
        self.step = int(self.steps.numpy())  # counted on the host from here: no device read

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every or not logs or "step_loss" not in logs:
            return
        with self.writer.as_default(step=self.step):
            tf.summary.scalar("step/loss", tf.reduce_mean(logs["step_loss"]))
            tf.summary.scalar("step/learning_rate", self.model.optimizer.learning_rate)


# ---------------------------------------------------------------------------
# One writer per run: train.lock.


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


# An empty lock older than this is no training's: a lock is written whole (`_create_lock`),
# and older versions wrote theirs within a moment of creating it.
_EMPTY_LOCK_SECONDS = 5


def _read_lock(path):
    """The lock's record {pid, host, start}; None when there is no lock; {"problem": "is
    empty" | "is garbled" | "cannot be read (why)", "age": seconds since written} when it
    holds no record."""
    try:
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
        written = tf.io.gfile.stat(path).mtime_nsec / 1e9
    except (tf.errors.NotFoundError, FileNotFoundError):
        return None
    except (OSError, tf.errors.OpError) as e:
        return {"problem": f"cannot be read ({workdir_lib.reason(e)})", "age": 0.0}
    try:
        record = json.loads(text)
        if isinstance(record.get("pid"), int) and isinstance(record.get("host"), str):
            return record
    except (ValueError, AttributeError):
        pass
    age = datetime.datetime.now().timestamp() - written
    return {"problem": "is empty" if not text.strip() else "is garbled", "age": age}


def _create_lock(path, text):
    """Creates the lock file `path` holding `text`, whole or not at all; False if it exists.

    The text goes to a temporary file first, then into place: by a hard link (atomic and
    exclusive; where links are unsupported, an exclusive create removed again if its write
    fails), or on object stores (gs://...), which have no exclusive create, by a rename.

    Raises:
      WorkdirError: the lock cannot be written (a full disk, permissions); nothing is left.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        if not workdir_lib.is_local(path):
            if tf.io.gfile.exists(path):
                return False
            with tf.io.gfile.GFile(temporary, "w") as f:
                f.write(text)
            tf.io.gfile.rename(temporary, path, overwrite=True)  # no exclusive rename there
            return True
        _write_file(temporary, os.O_TRUNC, text)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            _write_file(path, os.O_EXCL, text)
        return True
    except (FileExistsError, tf.errors.AlreadyExistsError):
        return False
    except (OSError, tf.errors.OpError) as e:
        raise workdir_lib.WorkdirError(
            f"could not write the lock file {path}: {workdir_lib.reason(e)}; the run is "
            "unchanged: free space (or fix the permission) and rerun the same command"
        ) from e
    finally:
        with contextlib.suppress(tf.errors.OpError, OSError):
            tf.io.gfile.remove(temporary)


def _write_file(path, flag, text):
    """Writes `text` to a new local file (O_CREAT | `flag`), synced; removed if that fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    try:
        try:
            f = os.fdopen(fd, "w")
        except BaseException:
            os.close(fd)
            raise
        with f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(path)
        raise


def _stale(workdir, path, holder, host):
    """Whether the lock `holder` (`_read_lock`) is left by a training that is gone, logging
    a warning then; raises WorkdirError naming what to do when it is (or may be) in use."""
    problem = holder.get("problem")
    if problem == "is empty" and holder["age"] >= _EMPTY_LOCK_SECONDS:
        logging.warning(
            "Taking over %s: it is empty, left by a training that stopped while writing it "
            "(a full disk or a crash).",
            path,
        )
        return True
    if problem:
        unnamed = "" if problem.startswith("cannot") else " (it names no training)"
        raise workdir_lib.WorkdirError(
            f"{path} {problem}{unnamed}; if no training is writing {workdir}, delete it and "
            "rerun the same command"
        )
    start = holder.get("start")
    alive = None
    if holder["host"] == host:
        now = _process_start(holder["pid"])
        alive = now is not None and (not start or not now or now == start)
    if alive is None:
        raise workdir_lib.WorkdirError(
            f"{workdir} is in use by pid {holder['pid']} on host {holder['host']} "
            f"({path}); wait for that training to end, or delete the lock file if it is gone"
        )
    if alive:
        raise workdir_lib.WorkdirError(
            f"{workdir} is in use by another training: pid {holder['pid']} on host {host} "
            f"({path}); wait for it to end or stop it, or train into another --workdir"
        )
    logging.warning(
        "Taking over %s: its process (pid %s on %s) is gone.", path, holder["pid"], holder["host"]
    )
    return True


@contextlib.contextmanager
def _lock(workdir):
    """Holds `workdir/train.lock` (pid, host) while the block runs; one training per run.

    The lock is written whole or not at all (`_create_lock`) and removed when the block ends,
    however it ends. A lock of a process that is gone (same host, pid not running, or running
    since another time) or left empty is taken over with a warning; a live holder stops this
    training with its pid and host, and a garbled lock with what to do.
    """
    with workdir_lib.writing(workdir, "the run folder"):
        tf.io.gfile.makedirs(workdir)
    path = os.path.join(workdir, workdir_lib.LOCK_FILE)
    pid, host = os.getpid(), socket.gethostname()
    record = {"pid": pid, "host": host, "start": _process_start(pid) or ""}
    for _ in range(3):
        if _create_lock(path, json.dumps(record) + "\n"):
            break
        holder = _read_lock(path)
        if holder is not None and _stale(workdir, path, holder, host):
            with contextlib.suppress(tf.errors.NotFoundError, FileNotFoundError):
                tf.io.gfile.remove(path)
    else:
        raise workdir_lib.WorkdirError(
            f"could not take the lock file {path}; rerun the same command"
        )
    try:
        yield path
    finally:
        with contextlib.suppress(tf.errors.OpError, OSError):
            if (_read_lock(path) or {}).get("pid") == pid:
                tf.io.gfile.remove(path)


def _prepare(workdir):
    """Creates `workdir` and removes leftovers of crashed saves (chief, under the lock)."""
    with workdir_lib.writing(workdir, "the run folder"):
        tf.io.gfile.makedirs(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    for stale in tf.io.gfile.glob(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, "*_temp*")):
        # A save that died midway (crash, full disk): CheckpointManager never reuses it.
        logging.warning("Removing %s, left by a checkpoint save that did not finish.", stale)
        with workdir_lib.writing(stale, "(removing) the partial checkpoint"):
            if tf.io.gfile.isdir(stale):
                tf.io.gfile.rmtree(stale)
            else:
                tf.io.gfile.remove(stale)


# ---------------------------------------------------------------------------
# flags.txt and its history.


def _flag(config, name):
    value = getattr(config, name)
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def _run_flags(workdir, config, saved, record):
    """The run's flags, which a rerun with `config` is checked against; None for a new run.

    Args:
      saved: the Config of flags.txt, or None.
      record: the identity.Record of the newest checkpoint, or None (none yet, or written
        before checkpoints carried one: flags.txt is the record then).

    Returns:
      flags.txt, with the record's values of the flags outside SAFE_TO_CHANGE (the record
      alone when flags.txt is missing).

    Raises:
      WorkdirError: a flag outside SAFE_TO_CHANGE differs and the run has a checkpoint,
        listing every such flag with the run's value and where it was read. Nothing is written.
    """
    run, where = saved, f"in {workdir_lib.FLAGS_FILE}"
    if record is not None:
        defining = {name: getattr(record.config, name) for name in _DEFINING}
        run = dataclasses.replace(saved or record.config, **defining)
        if run != saved:
            state = "is missing" if saved is None else "was edited"
            where = f"in its checkpoint {os.path.basename(record.checkpoint)}; "
            where += f"{workdir_lib.FLAGS_FILE} {state}"
    if run is None:
        return None
    refused = [name for name in _DEFINING if getattr(run, name) != getattr(config, name)]
    if refused and workdir_lib.checkpoint_paths(workdir):
        given = " ".join(_flag(config, name) for name in refused)
        theirs = " ".join(_flag(run, name) for name in refused)
        safe = ", ".join(f"--{name}" for name in SAFE_TO_CHANGE if name != "workdir")
        verb = "differs" if len(refused) == 1 else "differ"
        raise workdir_lib.WorkdirError(
            f"{given} {verb} from the run in {workdir} ({theirs} {where}): a checkpoint "
            f"cannot continue with another model, data, bank or optimizer; rerun with the "
            f"run's values or use a new --workdir (a rerun may change only {safe})"
        )
    return run


def _changes(run, config):
    """Names of the flags of `config` that differ from the run's flags `run` ([]: None)."""
    return [
        field.name
        for field in dataclasses.fields(config_lib.Config)
        if run is not None
        and field.name != "workdir"
        and getattr(run, field.name) != getattr(config, field.name)
    ]


def _restore_flags(workdir, run, saved, record):
    """Rewrites a missing or edited flags.txt as the run's flags `run` (from the checkpoint's
    record), with a warning naming what was wrong, and notes it in the history."""
    where = os.path.basename(record.checkpoint)
    path = os.path.join(workdir, workdir_lib.FLAGS_FILE)
    what = "is missing"
    if saved is not None:
        edited = [name for name in _DEFINING if getattr(saved, name) != getattr(run, name)]
        there = " ".join(_flag(saved, name) for name in edited)
        what = f"was edited ({there}; the record: {' '.join(_flag(run, n) for n in edited)})"
    logging.warning("%s %s; rewrote it from the run's record in checkpoint %s.", path, what, where)
    run = dataclasses.replace(run, workdir=workdir)
    workdir_lib.write_atomically(path, "\n".join(run.flagfile_lines()) + "\n", "the run's flags")
    _history(workdir, f"{workdir_lib.FLAGS_FILE} {what}: rewritten from the record in {where}")


def _history(workdir, line):
    path = os.path.join(workdir, workdir_lib.HISTORY_FILE)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with workdir_lib.writing(path, "the flag history"):
        with tf.io.gfile.GFile(path, "a") as f:
            f.write(f"{stamp} {line}\n")


def _write_flags(workdir, config, changed=(), epoch=0, previous=None):
    """Writes flags.txt (atomically) and appends what changed to flags_history.txt.

    Call it for a new run before training, and for a resumed run only after its checkpoint
    restored: a rerun that fails before never alters the run's record.
    """
    config = dataclasses.replace(config, workdir=workdir)
    path = os.path.join(workdir, workdir_lib.FLAGS_FILE)
    if previous is None:
        workdir_lib.write_atomically(
            path, "\n".join(config.flagfile_lines()) + "\n", "the run's flags"
        )
        _history(workdir, f"new run: {' '.join(config.flagfile_lines())}")
        return
    changed = [name for name in changed if name != "workdir"]
    if not changed:
        return
    workdir_lib.write_atomically(path, "\n".join(config.flagfile_lines()) + "\n", "the run's flags")
    what = ", ".join(f"{_flag(config, n)} (was {_flag(previous, n)})" for n in changed)
    _history(workdir, f"resumed after epoch {epoch} with {what}")


# ---------------------------------------------------------------------------
# Checkpoint saves and metrics.jsonl.


def _variables(parts):
    """Every variable of the checkpoint parts `parts` (variables, modules, models, optimizers)."""
    return [
        variable
        for part in parts.values()
        for variable in ([part] if isinstance(part, tf.Variable) else part.variables)
    ]


def _save_checkpoint(manager, number):
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
        raise workdir_lib.WorkdirError(
            f"could not write checkpoint {path}: {workdir_lib.reason(e)}; {kept}; free space and "
            "rerun the same command"
        ) from e


def _truncate_metrics(workdir, first_epoch):
    """Keeps the rows of epochs < first_epoch (later ones were written before a crash)."""
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return
    rows = [row for row in workdir_lib.read_metrics(workdir) if row["epoch"] < first_epoch]
    workdir_lib.write_atomically(
        path, "".join(json.dumps(row) + "\n" for row in rows), "the metrics"
    )


def _append_metrics(workdir, row):
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    with workdir_lib.writing(path, f"the metrics row of epoch {row['epoch']} to"):
        with tf.io.gfile.GFile(path, "a") as f:
            f.write(json.dumps(row) + "\n")
