"""The training loop: `train_and_evaluate(config, workdir)` trains (or resumes) one run.

The epoch boundary is one loop of named steps (`_train`):

    build -> for each epoch: rebuild graph -> fit epoch -> monitor -> log -> checkpoint

`_build` sets everything up once (strategy, data, model, restore, callbacks, monitors),
each part a named helper; the loop reads the result, a `_Training`. The run folder is one
object, a `rundir.RunDir` (open, restore, append a row, save, close). No absl flags here:
`invp_tf.train` is the command that turns flags into a `config.Config`.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from invp_tf import augment
from invp_tf import config as config_lib
from invp_tf import data
from invp_tf import distribute
from invp_tf import evaluation
from invp_tf import input_pipeline
from invp_tf import memory_plan
from invp_tf import model as model_lib
from invp_tf import neighbors
from invp_tf import preemption
from invp_tf import progress as progress_lib
from invp_tf import propagation
from invp_tf import rundir
from invp_tf import workdir as workdir_lib

# The purity monitor measures at most this many anchors (a fixed random sample).
_PURITY_MAX_ANCHORS = 10_000
# Exit status of a preempted run (TF's restart code on managed clusters).
PREEMPTED_EXIT_CODE = 42


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, a state holding inf or NaN); the last good
    checkpoint is kept."""


class Preempted(RuntimeError):
    """A worker got SIGTERM: every worker saved the same mid-epoch checkpoint and stopped."""


class Interrupted(Preempted):
    """Ctrl-C (SIGINT): saved and stopped as on SIGTERM, or (a second Ctrl-C, or one before
    training began) stopped at once, the last checkpoint kept."""


def graph_monitor(config, graph, rows, bank, train_labels, anchors, seed):
    """graph_recall, and with labels the purity of the positives the graph gives.

    graph: [N, k] built over `rows` ([N, D], the bank or fresh embeddings); the hard
    positives are chosen by similarity to the bank, as in the loss.
    """
    # Exact search on 2,000 sampled rows: how much of the true kNN graph the builder found.
    out = {"graph_recall": neighbors.graph_recall(rows, graph, seed=seed)}
    if train_labels is not None:
        # Labels only measure the positives; training never sees them.
        out.update(
            propagation.positive_purity(
                graph,
                bank,
                train_labels,
                anchors,
                num_layers=config.num_layers,
                num_positives=config.num_positives,
            )
        )
    return out


# What tf.data raises when an image file cannot be read or decoded.
_FILE_ERRORS = (
    tf.errors.NotFoundError,
    tf.errors.PermissionDeniedError,
    tf.errors.InvalidArgumentError,
    tf.errors.DataLossError,
)


@contextlib.contextmanager
def _naming_unreadable_images(sources, t=None):
    """Turns a failed read or decode deep inside tf.data into one line naming the file.

    A file that vanished or broke during training (`t`: the run) stops it: its epoch is not
    saved and the last good checkpoint stays (every training image owns a row of the bank,
    which would silently go stale without it).
    """
    try:
        yield
    except _FILE_ERRORS as e:
        for source in sources:
            bad = data.find_unreadable_images(source, limit=1) if source and source.paths else []
            if not bad:
                continue
            if t is None:
                raise ValueError(f"unreadable image: {bad[0]}") from e
            epoch = int(t.epoch_counter.numpy())
            what = "is gone" if not os.path.exists(bad[0]) else "cannot be read or decoded"
            raise ValueError(
                f"unreadable image: {bad[0]} {what} (epoch {epoch}); nothing was saved for "
                f"this epoch, {_last_good(t)}; training stops, as each image owns a row of the "
                "memory bank: restore the file and rerun the same command"
            ) from e
        raise


def _last_good(t):
    """'the last good checkpoint is PATH' (read back, every value finite), or that none is."""
    path = t.run_dir.last_good()
    return f"the last good checkpoint is {path}" if path else "no good checkpoint was saved yet"


def finished_message(workdir, epochs):
    """The one line for a rerun of a run that has trained all its epochs; None otherwise."""
    latest = tf.train.latest_checkpoint(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
    if not latest:
        return None
    done = workdir_lib.checkpoint_epoch(latest)
    if done is None or done < epochs:
        return None
    return (
        f"{workdir} is finished: {done}/{epochs} epochs trained, checkpoint {latest}; next: "
        f"python -m invp_tf.evaluate --workdir={workdir} --protocol=knn (or linear, semi), "
        f"python -m invp_tf.export --workdir={workdir} --export_dir=exported"
    )


def _distributed_dataset(strategy, make_pipeline, global_batch_size):
    """Per-replica batches of each worker's shard (`distribute_datasets_from_function`)."""
    if strategy.num_replicas_in_sync == 1:
        return make_pipeline(global_batch_size, 0, 1)

    def per_worker(context):
        return make_pipeline(
            context.get_per_replica_batch_size(global_batch_size),
            context.input_pipeline_id,
            context.num_input_pipelines,
        )

    # Each replica gets its own per-replica batches, in replica order, so the
    # global batch of a step is the same examples as on one device.
    return strategy.distribute_datasets_from_function(per_worker)


def train_and_evaluate(config, workdir, callbacks=(), strategy=None):
    """Trains (or resumes) a run in `workdir`; returns the last metrics row.

    Args:
      config: a config.Config.
      workdir: run directory (checkpoints/, tensorboard/, metrics.jsonl).
      callbacks: extra Keras callbacks passed to each epoch's fit (tests use
        one to interrupt a run).
      strategy: a tf.distribute strategy to train under; None builds the one of
        --strategy (tests share one MirroredStrategy per process).

    Raises:
      Preempted: SIGTERM reached a worker; the checkpoint to resume from is saved.
      Interrupted: Ctrl-C (SIGINT); during training it saves the state of the next step as
        SIGTERM does, a second one (or one before training began) stops at once.
      TrainingError: the loss became NaN, or a callback stopped an epoch midway.
      ValueError: a flag that cannot work (named), or a run folder problem.

    SIGTERM and SIGINT go back to their previous handlers afterwards (the preemption handler
    takes them over during training).
    """
    try:
        with preemption.handlers_restored(), contextlib.ExitStack() as on_exit:  # and the lock
            return _train(config, workdir, callbacks, strategy, on_exit)
    except KeyboardInterrupt:
        raise Interrupted(preemption.stopped_at_once(workdir)) from None


def _train(config, workdir, callbacks, strategy, on_exit):
    """The epoch loop: graph, fit, monitor, metrics row, checkpoint; returns the last row."""
    t = _build(config, workdir, strategy, on_exit)
    # An image file that vanished or broke mid-run: one line naming it (left with the lock).
    on_exit.enter_context(_naming_unreadable_images((t.train_source, t.test_source), t))
    row = {}
    if t.chief and t.first_epoch >= config.epochs:  # a rerun of a finished run: its last row
        row = (workdir_lib.read_metrics(workdir) or [{}])[-1]
    # The checkpoint is written after its epoch's row (so that a crash between them redoes the
    # epoch), so each row carries the seconds of the previous epoch's save (None in the first
    # epoch of a process).
    checkpoint_seconds = None
    for epoch in range(t.first_epoch, config.epochs):
        # > 0 only in the first epoch after a preemption save: steps already done.
        skip_steps = t.done_steps if epoch == t.first_epoch else 0
        uses_invariance = epoch >= config.rampup_epochs and config.lambda_inv > 0
        uses_graph = uses_invariance and config.positive_mode == "propagation"

        # 1. The kNN graph, rebuilt before every epoch (not when resuming mid-epoch: the
        # checkpoint holds the graph of this epoch). The loss reads it only once L_inv is on
        # (and never with --positive_mode=knn); before that, and in instance-only runs, it is
        # built for the monitor alone, so every arm logs the purity of its neighbours.
        graph = {}
        if (uses_graph or t.train_labels is not None) and not skip_steps:
            graph = _rebuild_graph(t, epoch)
        t.model.invariance_weight.assign(config.lambda_inv if uses_invariance else 0.0)

        # 2. One epoch of training; the data order and views depend only on (seed, epoch).
        fit = _fit_epoch(t, epoch, skip_steps, callbacks)

        # 3. kNN monitor on the test split (chief only).
        knn_top1, monitor_seconds = _monitor(t, epoch)

        # 4. Metrics row, then checkpoint (a crash between them redoes the epoch
        # and `truncate_metrics` drops the stale row).
        seconds = dict(
            graph_seconds=graph.get("graph_seconds"),
            purity_seconds=graph.get("purity_seconds"),
            train_seconds=fit["seconds"],
            monitor_seconds=monitor_seconds,
            checkpoint_seconds=checkpoint_seconds,
        )
        row = _metrics_row(t, epoch, fit, graph, knn_top1, uses_invariance, seconds)
        _check_finite(t, epoch)  # a state holding inf or NaN is never saved as good
        t.run_dir.append(row)
        checkpoint_seconds = _checkpoint(t, epoch)
        logging.info("epoch %d/%d metrics: %s", epoch + 1, config.epochs, json.dumps(row))
        t.progress.epoch_done(epoch, row)
    return row


# ---------------------------------------------------------------------------
# The steps of the epoch boundary.


def _rebuild_graph(t, epoch):
    """Builds the kNN graph (chief; every worker gets its copy) and measures it.

    Returns graph_seconds, purity_seconds (chief) and the monitor's metrics (graph_recall,
    the purity of the positives, and with --graph_features=fresh the bank graph's purity).
    """
    config = t.config
    rows_name = "fresh embeddings" if config.graph_features == "fresh" else "bank rows"
    start = t.progress.begin(epoch, f"kNN graph of the {t.num_examples} {rows_name}")
    if t.chief:
        bank = t.model.memory_bank.bank.numpy()  # [N, D], one host copy for all uses
        rows = t.fresh() if config.graph_features == "fresh" else bank
        graph = neighbors.build_knn_graph(rows, config.num_neighbors, config.knn_method)
    else:  # the template the chief's graph arrives in
        graph = np.zeros(t.model.knn_graph.shape, np.int32)
    graph = distribute.broadcast_from_chief(t.strategy, graph)
    t.model.knn_graph.assign(graph)
    out = {"graph_seconds": t.progress.end(epoch, "kNN graph", start)}
    if not t.chief:
        return out
    start = time.perf_counter()
    out.update(graph_monitor(config, graph, rows, bank, t.train_labels, t.purity_anchors, epoch))
    if config.graph_features == "fresh" and t.train_labels is not None:
        # The bank's graph on the same epoch, for comparison (monitor only).
        bank_graph = neighbors.build_knn_graph(bank, config.num_neighbors, config.knn_method)
        bank_metrics = graph_monitor(
            config, bank_graph, bank, bank, t.train_labels, t.purity_anchors, epoch
        )
        out.update({f"{k}_bank_graph": v for k, v in bank_metrics.items() if k != "graph_recall"})
    out["purity_seconds"] = t.progress.end(epoch, "graph recall and positive purity", start)
    return out


def _fit_epoch(t, epoch, skip_steps, callbacks):
    """Trains the rest of epoch `epoch`; returns its logs, seconds and steps.

    Raises:
      TrainingError: the loss is not finite, or a callback stopped fit midway.
    """
    config = t.config

    def pipeline(batch_size, shard_index, num_shards):
        return input_pipeline.train_pipeline(
            t.train_source,
            batch_size=batch_size,
            image_size=config.image_size,
            view=t.view,
            seed=config.seed,
            epoch=epoch,
            global_batch_size=config.batch_size,
            shard_index=shard_index,
            num_shards=num_shards,
            skip_steps=skip_steps,
        )

    # 0 when a preemption save came after the epoch's last step: only the
    # end-of-epoch work is left (its row then has no losses).
    remaining = t.steps_per_epoch - skip_steps
    fit = {"logs": {}, "seconds": None, "steps": remaining}
    if remaining:
        dataset = _distributed_dataset(t.strategy, pipeline, config.batch_size)
        start = t.progress.begin(epoch, f"training {remaining} steps")
        history = t.model.fit(
            dataset,
            epochs=1,
            steps_per_epoch=remaining,
            verbose=t.verbose,
            callbacks=[*t.fit_callbacks, *callbacks],
        )
        fit["seconds"] = t.progress.end(epoch, "training", start)
        logs = fit["logs"] = {name: values[-1] for name, values in history.history.items()}
        if not all(math.isfinite(logs.get(k, math.nan)) for k in ("loss_ins", "loss_inv")):
            raise TrainingError(
                f"loss became {logs.get('loss')} in epoch {epoch}; nothing was saved for "
                f"this epoch, {_last_good(t)} (lower --learning_rate or raise --temperature)"
            )
    steps = int(t.model.steps.numpy())
    if steps != (epoch + 1) * t.steps_per_epoch:
        # A callback stopped fit mid-epoch: saving now would resume as if it were done.
        raise TrainingError(
            f"epoch {epoch} stopped after {steps - epoch * t.steps_per_epoch} of "
            f"{t.steps_per_epoch} steps; nothing was saved for it, rerun to redo it"
        )
    return fit


def _monitor(t, epoch):
    """(kNN top-1 on the test split, seconds) every --eval_every epochs and after the last
    (chief only); (None, None) otherwise."""
    config = t.config
    if not t.chief or ((epoch + 1) % config.eval_every and epoch + 1 != config.epochs):
        return None, None
    start = t.progress.begin(epoch, "kNN monitor")
    train_features = t.fresh() if config.knn_features == "fresh" else None
    knn_top1 = evaluation.knn_monitor(
        config,
        t.infer,
        t.model.memory_bank.bank.numpy() if train_features is None else train_features,
        t.test_source,
        t.train_labels,
    )
    return knn_top1, t.progress.end(epoch, "kNN monitor", start)


def _metrics_row(t, epoch, fit, graph, knn_top1, uses_invariance, seconds):
    """The metrics.jsonl row of `epoch` (analyze and the benchmarks read these keys)."""
    logs = fit["logs"]
    return {
        "epoch": epoch,
        "loss": logs.get("loss"),
        "loss_ins": logs.get("loss_ins"),
        "loss_inv": logs.get("loss_inv") if uses_invariance else None,
        "knn_top1": knn_top1,
        "graph_seconds": seconds["graph_seconds"],
        "graph_recall": graph.get("graph_recall"),
        "purity_neighbors": graph.get("purity_neighbors"),
        "purity_hard": graph.get("purity_hard"),
        "mean_positives": graph.get("mean_positives"),
        **{k: v for k, v in graph.items() if k.endswith("_bank_graph")},
        "images_per_second": fit["seconds"] and fit["steps"] * t.config.batch_size / fit["seconds"],
        "learning_rate": float(t.optimizer.learning_rate.numpy()),
        **{k: v for k, v in seconds.items() if k != "graph_seconds"},
    }


def _check_finite(t, epoch):
    """Raises TrainingError when a variable holds inf or NaN after `epoch` (BatchNorm's
    moving statistics can blow up while the loss stays finite)."""
    bad = t.run_dir.nonfinite()
    if bad:
        raise TrainingError(
            f"the state after epoch {epoch} holds {workdir_lib.NonFiniteError(bad)}; nothing was "
            f"saved for this epoch, {_last_good(t)} (lower --learning_rate or --weight_decay)"
        )


def _checkpoint(t, epoch):
    """Saves the state after `epoch` as ckpt-(epoch + 1); returns the seconds it took."""
    t.epoch_counter.assign(epoch + 1)
    start = time.perf_counter()
    t.run_dir.save(epoch + 1)
    return t.progress.end(epoch, "checkpoint", start)


# ---------------------------------------------------------------------------
# Setup, once per process: `_build` and its named parts.


@dataclasses.dataclass
class _Training:
    """Everything the epoch loop reads, built once by `_build`."""

    config: config_lib.Config
    run_dir: rundir.RunDir  # the run folder: metrics rows, checkpoints, TensorBoard
    strategy: tf.distribute.Strategy
    chief: bool
    train_source: data.Source
    test_source: data.Source | None
    num_examples: int
    steps_per_epoch: int
    view: Callable
    model: model_lib.InvPModel
    optimizer: keras.optimizers.Optimizer  # a LossScaleOptimizer under mixed_float16
    epoch_counter: tf.Variable
    infer: Callable
    fresh: evaluation.FreshEmbeddings
    first_epoch: int
    done_steps: int  # steps of first_epoch already done: > 0 only after a preemption save
    fit_callbacks: list
    verbose: object
    train_labels: np.ndarray | None  # [N] by index, for the monitors only
    purity_anchors: np.ndarray
    progress: progress_lib.EpochProgress


def _build(config, workdir, strategy, on_exit):
    """Checks the flags, builds model and optimizer, restores the newest checkpoint."""
    if strategy is None:
        strategy = distribute.make_strategy(
            config.strategy, tpu=config.tpu, cpu_devices=config.cpu_devices
        )
    chief = distribute.is_chief(strategy)
    train_source, test_source = _load_data(config, workdir, strategy)
    num_examples = train_source.num_examples
    # Before anything is written or allocated: over the device's memory is one line.
    memory_plan.check_config(config, num_examples, strategy)
    # A rerun may change only flags that keep the model, data, bank and optimizer state.
    run_dir = on_exit.enter_context(rundir.RunDir.open(config, workdir, chief, train_source))
    steps_per_epoch = num_examples // config.batch_size
    model, epoch_counter = _build_model(config, strategy, num_examples, steps_per_epoch)
    resumed_from = run_dir.restore(
        strategy,
        encoder=model.encoder,
        optimizer=model.optimizer,
        bank=model.memory_bank,
        graph=model.knn_graph,
        epoch=epoch_counter,
        step=model.steps,
    )
    infer = evaluation.inference_function(model.encoder)
    fresh = evaluation.FreshEmbeddings(infer, train_source, config, model.steps)
    if not resumed_from and config.bank_init == "encoder":
        model.memory_bank.assign(fresh())
    first_epoch = int(epoch_counter.numpy())
    if resumed_from:
        logging.info(
            "Resumed from %s (epoch %d, step %d).",
            resumed_from,
            first_epoch,
            int(model.steps.numpy()),
        )
    fit_callbacks = [
        keras.callbacks.TerminateOnNaN(),
        *_preemption_callbacks(strategy, model, run_dir.manager, run_dir.save),
    ]
    train_labels, purity_anchors = _monitor_labels(config, train_source)
    if chief:  # about 10 points per epoch, at least every 50 steps
        every = max(1, min(50, steps_per_epoch // 10))
        fit_callbacks.append(run_dir.step_summaries(model.steps, every))
    return _Training(
        config=config,
        run_dir=run_dir,
        strategy=strategy,
        chief=chief,
        train_source=train_source,
        test_source=test_source,
        num_examples=num_examples,
        steps_per_epoch=steps_per_epoch,
        view=view_from_config(config),
        model=model,
        optimizer=model.optimizer,
        epoch_counter=epoch_counter,
        infer=infer,
        fresh=fresh,
        first_epoch=first_epoch,
        done_steps=int(model.steps.numpy()) - first_epoch * steps_per_epoch,
        fit_callbacks=fit_callbacks,
        verbose=("auto" if sys.stdout.isatty() else 2) if chief else 0,  # the chief's is enough
        train_labels=train_labels,
        purity_anchors=purity_anchors,
        progress=progress_lib.EpochProgress(first_epoch, config.epochs),
    )


def _load_data(config, workdir, strategy):
    """The train and test sources, after every check that needs no write (nothing is
    written to the workdir before the flags are checked)."""
    rundir.RunDir.check(workdir)
    keras.utils.set_random_seed(config.seed)
    data_dir = config.data_dir or None
    train_source = data.load_source(config.dataset, "train", data_dir, config.train_examples)
    test_source = data.load_source(config.dataset, "test", data_dir)
    config.validate(train_source.num_examples)
    if config.jit_compile and isinstance(strategy, tf.distribute.MirroredStrategy):
        if not tf.config.list_logical_devices("GPU"):
            raise ValueError(
                "--jit_compile does not work with --strategy=mirrored on CPU devices "
                "(XLA cannot reach the other logical CPU's variables); drop one of them"
            )
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"--batch_size={config.batch_size} does not split over the {replicas} replicas of "
            f"--strategy={config.strategy} (use a multiple of {replicas})"
        )
    return train_source, test_source


def view_from_config(config):
    """The training view of `config`: fn(image, seed, image_size) (augment.RECIPES)."""
    view = augment.get_view(config.augment)
    if config.augment == "crop_flip":
        view = functools.partial(view, scale=(config.crop_scale, 1.0))
    return view


def _build_model(config, strategy, num_examples, steps_per_epoch):
    """The compiled InvPModel (optimizer slots built) and the epoch counter, under `strategy`."""
    replicas = strategy.num_replicas_in_sync
    policy = distribute.precision_policy(strategy, config.mixed_precision)
    # Every variable (weights, optimizer slots, bank, graph, counters) is created
    # under the strategy: mirrored on every replica and worker.
    with strategy.scope(), distribute.dtype_policy(policy):
        model = model_lib.model_from_config(
            config, num_examples, config.sync_batchnorm and replicas > 1
        )
        encoder = model.encoder
        model.compile(
            optimizer=keras.optimizers.SGD(
                model_lib.learning_rate_schedule(config, steps_per_epoch),
                momentum=config.optimizer_momentum,
                weight_decay=config.weight_decay or None,
            ),
            jit_compile=config.jit_compile,
        )
        model.optimizer.build(encoder.trainable_variables)  # so a restore fills its slots
        epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    return model, epoch_counter


def _preemption_callbacks(strategy, model, manager, save):
    """SIGTERM on any worker: all save the same step's state, then stop (not on TPU).

    Ctrl-C (SIGINT) on a worker does the same (`preemption.save_on_ctrl_c`).
    """
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return []
    preemption_step = {}
    interrupted = []  # the Ctrl-C received (a second one stops at once)

    def save_preempted(*args, **kwargs):
        preemption_step["step"] = int(model.steps.numpy())
        preemption_step["path"] = save(preemption_step["step"])

    def stop_preempted():
        error, what = (
            (Interrupted, "interrupted (Ctrl-C)") if interrupted else (Preempted, "preempted")
        )
        raise error(
            f"{what}: saved {preemption_step.get('path')} at step "
            f"{preemption_step.get('step')}; rerun the same command to resume"
        )

    on_sigterm = signal.getsignal(signal.SIGTERM)
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver if distribute.is_multi_worker(strategy) else None,
        manager,
        termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=stop_preempted, save_fn=save_preempted
        ),
    )
    if signal.getsignal(signal.SIGTERM) is not on_sigterm:  # the handler's: Ctrl-C joins it
        preemption.save_on_ctrl_c(signal.getsignal(signal.SIGTERM), interrupted)
    return [preemption.SaveIfPreempted(handler)]


def _monitor_labels(config, train_source):
    """(labels by index or None, the purity monitor's anchors: all rows of small banks, a
    fixed sample of large ones). Labels only measure; training never sees them."""
    num_examples = train_source.num_examples
    with _naming_unreadable_images((train_source,)):
        train_labels = data.labels_by_index(train_source) if train_source.num_classes else None
    purity_anchors = np.arange(num_examples)
    if num_examples > _PURITY_MAX_ANCHORS:
        rng = np.random.default_rng(config.seed)
        purity_anchors = np.sort(rng.choice(num_examples, _PURITY_MAX_ANCHORS, replace=False))
    return train_labels, purity_anchors
