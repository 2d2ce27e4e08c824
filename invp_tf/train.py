"""Pretrain an encoder with Invariance Propagation.

    python -m invp_tf.train --flagfile=configs/fashion_mnist.flags --workdir=runs/demo

Every field of `config.Config` is a flag; `main` turns flags into a Config and
calls `train_and_evaluate`, the one readable epoch loop. Rerunning the same
command resumes from the last checkpoint in --workdir.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from invp_tf import augment
from invp_tf import config as config_lib
from invp_tf import data
from invp_tf import distribute
from invp_tf import evaluation
from invp_tf import model as model_lib
from invp_tf import neighbors
from invp_tf import propagation
from invp_tf import workdir as workdir_lib

# The purity monitor measures at most this many anchors (a fixed random sample).
_PURITY_MAX_ANCHORS = 10_000
# Smallest --image_size: a crop of 8x8 pixels still has structure after the encoder's stem.
MIN_IMAGE_SIZE = 8


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss); the last good checkpoint is kept."""


def validate(config, num_examples):
    """Raises ValueError naming the flag whose value cannot work with N rows."""
    for name, choices in config_lib.CHOICES.items():
        if getattr(config, name) not in choices:
            raise ValueError(f"--{name}={getattr(config, name)} is not one of {', '.join(choices)}")
    checks = [
        (
            config.num_background <= num_examples,
            f"--num_background={config.num_background} exceeds the {num_examples} training images",
        ),
        (
            1 <= config.num_neighbors < num_examples,
            f"--num_neighbors={config.num_neighbors} must be in [1, {num_examples}) "
            f"(the dataset has {num_examples} training images)",
        ),
        (
            1 <= config.batch_size <= num_examples,
            f"--batch_size={config.batch_size} must be in [1, {num_examples}] "
            f"(the dataset has {num_examples} training images)",
        ),
        (config.num_background >= 1, f"--num_background={config.num_background} must be >= 1"),
        (config.num_layers >= 1, f"--num_layers={config.num_layers} must be >= 1"),
        (config.num_positives >= 1, f"--num_positives={config.num_positives} must be >= 1"),
        (config.num_knn_positives >= 0, f"--num_knn_positives={config.num_knn_positives} < 0"),
        (config.embedding_dim >= 1, f"--embedding_dim={config.embedding_dim} must be >= 1"),
        (
            config.image_size >= MIN_IMAGE_SIZE,
            f"--image_size={config.image_size} must be >= {MIN_IMAGE_SIZE} (smaller crops "
            "leave the encoder nothing to see)",
        ),
        (config.temperature > 0, f"--temperature={config.temperature} must be > 0"),
        (config.epochs >= 1, f"--epochs={config.epochs} must be >= 1"),
        (config.eval_every >= 1, f"--eval_every={config.eval_every} must be >= 1"),
        (config.knn_k >= 1, f"--knn_k={config.knn_k} must be >= 1"),
        (config.learning_rate > 0, f"--learning_rate={config.learning_rate} must be > 0"),
        (0 < config.crop_scale <= 1, f"--crop_scale={config.crop_scale} must be in (0, 1]"),
        (
            0 <= config.memory_momentum < 1,
            f"--memory_momentum={config.memory_momentum} must be in [0, 1)",
        ),
    ]
    try:
        config.lr_decay_epoch_list  # noqa: B018 (parsed here to name the flag on error)
    except ValueError:
        raise ValueError(
            f"--lr_decay_epochs={config.lr_decay_epochs} must be comma-separated integers"
        ) from None
    if config.positive_mode == "knn":
        k = config.num_knn_positives or propagation.max_set_size(
            config.num_neighbors, config.num_layers
        )
        # "The K rows of TopM(i) most similar to v_i, minus i": TopM must hold K + 1 rows.
        top = config.num_background if config.hard_negatives else num_examples
        checks.append(
            (
                k + 1 <= min(top, num_examples),
                f"--num_knn_positives={k} needs K + 1 = {k + 1} <= --num_background "
                f"({config.num_background}) and <= the {num_examples} training images",
            )
        )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def learning_rate_schedule(config, steps_per_epoch):
    """Keras schedule over optimizer steps: optional linear warm-up, then
    cosine to 0, step (/10 at --lr_decay_epochs) or constant."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.learning_rate,
            decay_steps=max(total - warmup, 1),
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    if config.lr_schedule == "step":
        boundaries = [e * steps_per_epoch for e in config.lr_decay_epoch_list]
        values = [config.learning_rate * 0.1**i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    # Constant, but still a schedule: a float learning rate becomes an optimizer
    # variable, which would change the checkpoint layout between schedules.
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, 1, alpha=1.0)


class FreshEmbeddings:
    """Embeddings [N, D] of the current encoder over the training images (eval view), by index.

    The kNN monitor (--knn_features=fresh) and the graph (--graph_features=fresh) both
    read them; one pass serves both while the weights have not changed since.
    """

    def __init__(self, infer, train_source, config, steps):
        self._infer, self._source, self._steps = infer, train_source, steps
        self._batch_size = max(config.batch_size, 256)
        self._image_size = config.image_size
        self._cache = (None, None)  # (train steps when computed, embeddings)

    def __call__(self):
        steps = int(self._steps.numpy())
        if self._cache[0] != steps:
            pipeline = data.eval_pipeline(
                self._source, batch_size=self._batch_size, image_size=self._image_size
            )
            features, index, _ = evaluation.extract_embeddings(self._infer, pipeline)
            self._cache = (steps, features[np.argsort(index)])
        return self._cache[1]


def knn_monitor(config, infer, train_features, test_source, train_labels):
    """Weighted kNN top-1 on the test split; None when it has no labels.

    train_features: [N, D] the bank or fresh embeddings of the training images, by index.
    """
    if test_source is None or not test_source.num_classes:
        return None
    pipeline = data.eval_pipeline(
        test_source, batch_size=max(config.batch_size, 256), image_size=config.image_size
    )
    test_features, _, test_labels = evaluation.extract_embeddings(infer, pipeline)
    predictions = evaluation.knn_classify(
        train_features,
        train_labels,
        test_features,
        k=config.knn_k,
        temperature=config.knn_temperature,
        num_classes=test_source.num_classes,
    )
    return float(np.mean(predictions == test_labels))


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


@contextlib.contextmanager
def _naming_unreadable_images(source):
    """Turns a decode failure deep inside tf.data into an error naming the file."""
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        bad = data.find_unreadable_images(source, limit=1) if source.paths else []
        if bad:
            raise ValueError(f"unreadable image: {bad[0]}") from e
        raise


def finished_message(workdir, epochs):
    """The one line for a rerun of a run that has trained all its epochs; None otherwise."""
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if not latest:
        return None
    try:
        # The checkpoint reader runs no TF op: a multi-worker strategy, created after this
        # check, can still configure its collectives (they must precede the first op).
        done = int(tf.train.load_variable(latest, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    except ValueError:
        # The reader takes "ckpt-N" for a folder on file systems where any path prefix is one
        # (TF's ram://); a Checkpoint restore reads it.
        epoch = tf.Variable(0, dtype=tf.int64)
        try:
            tf.train.Checkpoint(epoch=epoch).restore(latest).expect_partial()
        except (tf.errors.OpError, ValueError):
            return None
        done = int(epoch.numpy())
    except tf.errors.OpError:  # unreadable: training's restore reports it
        return None
    if done < epochs:
        return None
    return (
        f"{workdir} is finished: {done}/{epochs} epochs trained, checkpoint {latest}; next: "
        f"python -m invp_tf.evaluate --workdir={workdir} --protocol=knn (or linear, semi), "
        f"python -m invp_tf.export --workdir={workdir} --export_dir=exported"
    )


class _Progress:
    """Logs "epoch e/E" lines: each epoch-boundary step with its seconds, each epoch with an ETA.

    Epochs are counted from 1 here (metrics.jsonl and checkpoints count finished epochs).
    """

    def __init__(self, first_epoch, epochs):
        self.first_epoch, self.epochs = first_epoch, epochs
        self.start = time.perf_counter()

    def begin(self, epoch, what):
        logging.info("epoch %d/%d: %s ...", epoch + 1, self.epochs, what)
        return time.perf_counter()

    def end(self, epoch, what, start):
        seconds = time.perf_counter() - start
        logging.info("epoch %d/%d: %s took %.1f s", epoch + 1, self.epochs, what, seconds)
        return seconds

    def epoch_done(self, epoch, row):
        seconds_per_epoch = (time.perf_counter() - self.start) / (epoch + 1 - self.first_epoch)
        left = (self.epochs - epoch - 1) * seconds_per_epoch
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        knn = row.get("knn_top1")
        logging.info(
            "epoch %d/%d done: loss %s, kNN top-1 %s; %.0f s per epoch, ETA %s (%s left)",
            epoch + 1,
            self.epochs,
            "-" if row.get("loss") is None else f"{row['loss']:.4f}",
            "-" if knn is None else f"{knn:.4f}",
            seconds_per_epoch,
            finish,
            f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min",
        )


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


# Exit status of a preempted run (TF's restart code on managed clusters).
PREEMPTED_EXIT_CODE = 42


class Preempted(RuntimeError):
    """A worker got SIGTERM: every worker saved the same mid-epoch checkpoint and stopped."""


class _SaveIfPreempted(keras.callbacks.Callback):
    """After every step, lets TF's PreemptionCheckpointHandler save and stop all workers."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def on_train_batch_end(self, batch, logs=None):
        self.handler.save_checkpoint_if_preempted()


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

    See `_train_and_evaluate`; this wrapper gives SIGTERM back to its previous
    handler afterwards (the preemption handler takes it over during training).
    """
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.ExitStack() as on_exit:  # releases the run's lock
            return _train_and_evaluate(config, workdir, callbacks, strategy, on_exit)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _train_and_evaluate(config, workdir, callbacks, strategy, on_exit):
    """Trains (or resumes) a run in `workdir`; returns the last metrics row.

    Args:
      config: a config.Config.
      workdir: run directory (checkpoints/, tensorboard/, metrics.jsonl).
      callbacks: extra Keras callbacks passed to each epoch's fit (tests use
        one to interrupt a run).
      strategy: a tf.distribute strategy to train under; None builds the one of
        --strategy (tests share one MirroredStrategy per process).
      on_exit: an ExitStack that holds the run's lock until training ends.

    Raises:
      Preempted: SIGTERM reached a worker; the checkpoint to resume from is saved.
    """
    if strategy is None:
        strategy = distribute.make_strategy(
            config.strategy, tpu=config.tpu, cpu_devices=config.cpu_devices
        )
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    # Nothing is written to the workdir before the flags are checked.
    workdir_lib.check_workdir(workdir)
    keras.utils.set_random_seed(config.seed)
    data_dir = config.data_dir or None
    train_source = data.load_source(config.dataset, "train", data_dir, config.train_examples)
    test_source = data.load_source(config.dataset, "test", data_dir)
    num_examples = train_source.num_examples
    validate(config, num_examples)
    if config.jit_compile and isinstance(strategy, tf.distribute.MirroredStrategy):
        if not tf.config.list_logical_devices("GPU"):
            raise ValueError(
                "--jit_compile does not work with --strategy=mirrored on CPU devices "
                "(XLA cannot reach the other logical CPU's variables); drop one of them"
            )
    if config.batch_size % replicas:
        raise ValueError(
            f"--batch_size={config.batch_size} does not split over the {replicas} replicas of "
            f"--strategy={config.strategy} (use a multiple of {replicas})"
        )
    if chief:  # one training per run; a second one stops here naming the first
        on_exit.enter_context(workdir_lib.lock(workdir))
    # A rerun may change only flags that keep the model, data, bank and optimizer state.
    changed = workdir_lib.flag_changes(workdir, config)
    previous_flags = workdir_lib.read_flags(workdir)
    if chief:
        workdir_lib.prepare(workdir)  # removes partial saves of earlier crashes
        workdir_lib.repair_checkpoint_state(workdir)
        if not workdir_lib.checkpoint_paths(workdir):  # a new run (or one without a checkpoint)
            workdir_lib.write_flags(workdir, config)
    steps_per_epoch = num_examples // config.batch_size
    view = augment.get_view(config.augment)
    if config.augment == "crop_flip":
        view = functools.partial(view, scale=(config.crop_scale, 1.0))

    loss_options = dict(
        temperature=config.temperature,
        num_background=config.num_background,
        num_layers=config.num_layers,
        num_positives=config.num_positives,
        background=config.background,
        positive_mode=config.positive_mode,
        hard_positives=config.hard_positives,
        hard_negatives=config.hard_negatives,
        num_knn_positives=config.num_knn_positives or None,
        background_search=config.background_search,
    )
    policy = distribute.precision_policy(strategy, config.mixed_precision)
    # Every variable (weights, optimizer slots, bank, graph, counters) is created
    # under the strategy: mirrored on every replica and worker.
    with strategy.scope(), distribute.dtype_policy(policy):
        encoder = workdir_lib.encoder_from_config(
            config, sync_batchnorm=config.sync_batchnorm and replicas > 1
        )
        model = model_lib.InvPModel(
            encoder,
            num_examples,
            embedding_dim=config.embedding_dim,
            num_neighbors=config.num_neighbors,
            memory_momentum=config.memory_momentum,
            seed=config.seed,
            loss_options=loss_options,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate_schedule(config, steps_per_epoch),
                momentum=config.optimizer_momentum,
                weight_decay=config.weight_decay or None,
            ),
            jit_compile=config.jit_compile,
        )
        optimizer = model.optimizer  # a LossScaleOptimizer under mixed_float16
        optimizer.build(encoder.trainable_variables)  # so a restore fills its slots
        epoch_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    parts = dict(
        encoder=encoder,
        optimizer=optimizer,
        bank=model.memory_bank,
        graph=model.knn_graph,
        epoch=epoch_counter,
    )
    checkpoint = tf.train.Checkpoint(step=model.steps, **parts)

    def restore(path):
        saved = [name for name, _ in tf.train.list_variables(path)]
        if any(name.startswith("step/") for name in saved):
            checkpoint.restore(path).assert_existing_objects_matched()
        else:  # written before steps were counted apart: every step was applied then
            tf.train.Checkpoint(**parts).restore(path).assert_existing_objects_matched()
            model.steps.assign(optimizer.iterations)

    # The newest readable checkpoint (a corrupt one is named and set aside), before the
    # managers below read the checkpoint list.
    resumed_from = workdir_lib.restore_newest(workdir, restore, set_aside=chief)
    if resumed_from and chief:  # the run's record changes only once its state is back
        workdir_lib.write_flags(
            workdir, config, changed, int(epoch_counter.numpy()), previous_flags
        )

    # CheckpointManager writes the data files first and then replaces the small
    # `checkpoint` index file, so a crash mid-save leaves the previous one valid.
    # Every worker reads the chief's checkpoints; the others write scratch copies.
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=3)
    write_manager = manager
    if not chief:
        write_manager = tf.train.CheckpointManager(
            checkpoint, distribute.checkpoint_directory(strategy, checkpoint_dir), max_to_keep=1
        )

    def save(number):
        path = workdir_lib.save_checkpoint(write_manager, number)
        if not chief:
            tf.io.gfile.rmtree(write_manager.directory)
        return path

    infer = evaluation.inference_function(encoder)
    fresh = FreshEmbeddings(infer, train_source, config, model.steps)
    if not resumed_from and config.bank_init == "encoder":
        model.memory_bank.assign(fresh())
    first_epoch = int(epoch_counter.numpy())
    # Steps of the first epoch already done: > 0 only after a preemption save.
    done_steps = int(model.steps.numpy()) - first_epoch * steps_per_epoch
    if resumed_from:
        logging.info(
            "Resumed from %s (epoch %d, step %d).",
            resumed_from,
            first_epoch,
            int(model.steps.numpy()),
        )
    preemption_callbacks = []
    if not isinstance(strategy, tf.distribute.TPUStrategy):
        # SIGTERM on any worker: all save the same step's state, then stop.
        preemption_step = {}

        def save_preempted(*args, **kwargs):
            preemption_step["step"] = int(model.steps.numpy())
            preemption_step["path"] = save(preemption_step["step"])

        def stop_preempted():
            raise Preempted(
                f"preempted: saved {preemption_step.get('path')} at step "
                f"{preemption_step.get('step')}; rerun the same command to resume"
            )

        handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver if distribute.is_multi_worker(strategy) else None,
            manager,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=stop_preempted, save_fn=save_preempted
            ),
        )
        preemption_callbacks.append(_SaveIfPreempted(handler))
    if chief:
        workdir_lib.truncate_metrics(workdir, first_epoch)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) if chief else None
    with _naming_unreadable_images(train_source):
        train_labels = data.labels_by_index(train_source) if train_source.num_classes else None
    # Anchors of the purity monitor: all rows of small banks, a fixed sample of large ones.
    purity_anchors = np.arange(num_examples)
    if num_examples > _PURITY_MAX_ANCHORS:
        rng = np.random.default_rng(config.seed)
        purity_anchors = np.sort(rng.choice(num_examples, _PURITY_MAX_ANCHORS, replace=False))
    verbose = 0  # the chief's progress is enough
    if chief:
        verbose = "auto" if sys.stdout.isatty() else 2
    row = {}
    if chief and first_epoch >= config.epochs:  # a rerun of a finished run: its last row
        row = (workdir_lib.read_metrics(workdir) or [{}])[-1]
    progress = _Progress(first_epoch, config.epochs)
    step_summaries = []
    if chief:  # about 10 points per epoch, at least every 50 steps
        every = max(1, min(50, steps_per_epoch // 10))
        step_summaries.append(_StepSummaries(writer, model.steps, every))

    for epoch in range(first_epoch, config.epochs):
        skip_steps = done_steps if epoch == first_epoch else 0
        # 1. The kNN graph, rebuilt before every epoch (not when resuming mid-epoch: the
        # checkpoint holds the graph of this epoch). The loss reads it only once L_inv is on
        # (and never with --positive_mode=knn); before that, and in instance-only runs, it is
        # built for the monitor alone, so every arm logs the purity of its neighbours.
        # The chief builds it; every worker gets the chief's copy.
        uses_invariance = epoch >= config.rampup_epochs and config.lambda_inv > 0
        uses_graph = uses_invariance and config.positive_mode == "propagation"
        graph_seconds = None
        graph_metrics = {}
        if (uses_graph or train_labels is not None) and not skip_steps:
            rows_name = "fresh embeddings" if config.graph_features == "fresh" else "bank rows"
            start = progress.begin(epoch, f"kNN graph of the {num_examples} {rows_name}")
            if chief:
                bank = model.memory_bank.bank.numpy()  # [N, D], one host copy for all uses
                rows = fresh() if config.graph_features == "fresh" else bank
                graph = neighbors.build_knn_graph(rows, config.num_neighbors, config.knn_method)
            else:  # the template the chief's graph arrives in
                graph = np.zeros(model.knn_graph.shape, np.int32)
            graph = distribute.broadcast_from_chief(strategy, graph)
            model.knn_graph.assign(graph)
            graph_seconds = progress.end(epoch, "kNN graph", start)
            start = time.perf_counter()
            if chief:
                graph_metrics = graph_monitor(
                    config, graph, rows, bank, train_labels, purity_anchors, epoch
                )
            if chief and config.graph_features == "fresh" and train_labels is not None:
                # The bank's graph on the same epoch, for comparison (monitor only).
                bank_graph = neighbors.build_knn_graph(
                    bank, config.num_neighbors, config.knn_method
                )
                bank_metrics = graph_monitor(
                    config, bank_graph, bank, bank, train_labels, purity_anchors, epoch
                )
                graph_metrics.update(
                    {f"{k}_bank_graph": v for k, v in bank_metrics.items() if k != "graph_recall"}
                )
            if chief:
                progress.end(epoch, "graph recall and positive purity", start)
        model.invariance_weight.assign(config.lambda_inv if uses_invariance else 0.0)

        # 2. One epoch of training; the data order and views depend only on (seed, epoch).
        def pipeline(batch_size, shard_index, num_shards, epoch=epoch, skip_steps=skip_steps):
            return data.train_pipeline(
                train_source,
                batch_size=batch_size,
                image_size=config.image_size,
                view=view,
                seed=config.seed,
                epoch=epoch,
                global_batch_size=config.batch_size,
                shard_index=shard_index,
                num_shards=num_shards,
                skip_steps=skip_steps,
            )

        # 0 when a preemption save came after the epoch's last step: only the
        # end-of-epoch work below is left (its row then has no losses).
        remaining = steps_per_epoch - skip_steps
        logs, train_seconds = {}, None
        if remaining:
            dataset = _distributed_dataset(strategy, pipeline, config.batch_size)
            start = progress.begin(epoch, f"training {remaining} steps")
            with _naming_unreadable_images(train_source):
                history = model.fit(
                    dataset,
                    epochs=1,
                    steps_per_epoch=remaining,
                    verbose=verbose,
                    callbacks=[
                        keras.callbacks.TerminateOnNaN(),
                        *preemption_callbacks,
                        *step_summaries,
                        *callbacks,
                    ],
                )
            train_seconds = progress.end(epoch, "training", start)
            logs = {name: values[-1] for name, values in history.history.items()}
            if not all(math.isfinite(logs.get(k, math.nan)) for k in ("loss_ins", "loss_inv")):
                raise TrainingError(
                    f"loss became {logs.get('loss')} in epoch {epoch}; nothing was saved for "
                    f"this epoch, the last good checkpoint is {manager.latest_checkpoint} "
                    "(lower --learning_rate or raise --temperature)"
                )
        finished = int(model.steps.numpy()) == (epoch + 1) * steps_per_epoch
        if not finished:
            # A callback stopped fit mid-epoch: saving now would resume as if it were done.
            done = int(model.steps.numpy()) - epoch * steps_per_epoch
            raise TrainingError(
                f"epoch {epoch} stopped after {done} of {steps_per_epoch} steps; nothing was "
                "saved for it, rerun to redo it"
            )

        # 3. kNN monitor on the test split (chief only).
        knn_top1 = None
        if chief and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            start = progress.begin(epoch, "kNN monitor")
            train_features = fresh() if config.knn_features == "fresh" else None
            knn_top1 = knn_monitor(
                config,
                infer,
                model.memory_bank.bank.numpy() if train_features is None else train_features,
                test_source,
                train_labels,
            )
            progress.end(epoch, "kNN monitor", start)

        # 4. Metrics row, then checkpoint (a crash between them redoes the epoch
        # and `truncate_metrics` drops the stale row).
        row = {
            "epoch": epoch,
            "loss": logs.get("loss"),
            "loss_ins": logs.get("loss_ins"),
            "loss_inv": logs.get("loss_inv") if uses_invariance else None,
            "knn_top1": knn_top1,
            "graph_seconds": graph_seconds,
            "graph_recall": graph_metrics.get("graph_recall"),
            "purity_neighbors": graph_metrics.get("purity_neighbors"),
            "purity_hard": graph_metrics.get("purity_hard"),
            "mean_positives": graph_metrics.get("mean_positives"),
            **{k: v for k, v in graph_metrics.items() if k.endswith("_bank_graph")},
            "images_per_second": train_seconds and remaining * config.batch_size / train_seconds,
            "learning_rate": float(optimizer.learning_rate.numpy()),
        }
        if chief:
            workdir_lib.append_metrics(workdir, row)
            with writer.as_default(step=epoch + 1):
                for name, value in row.items():
                    if name != "epoch" and value is not None:
                        tf.summary.scalar(name, value)
        epoch_counter.assign(epoch + 1)
        start = time.perf_counter()
        save(epoch + 1)
        progress.end(epoch, "checkpoint", start)
        logging.info("epoch %d/%d metrics: %s", epoch + 1, config.epochs, json.dumps(row))
        progress.epoch_done(epoch, row)
    return row


# ---------------------------------------------------------------------------
# Command line: one flag per Config field.

_FLAGS = {}
for _field in dataclasses.fields(config_lib.Config):
    _define = {
        bool: flags.DEFINE_bool,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }[type(_field.default)]
    _FLAGS[_field.name] = _define(_field.name, _field.default, _field.metadata["help"])


NO_FLAGFILE = (
    "no --flagfile: the built-in defaults are the paper's ImageNet recipe (ResNet-50, 224 px, "
    "800 epochs); start from a recipe: --flagfile=configs/fashion_mnist.flags (the CPU demo), "
    "configs/cifar10_r18.flags (CIFAR-10), configs/r50.flags (ImageNet), or RUN/flags.txt "
    "(replays a run); any flag after it overrides the recipe"
)


def _flagfile_given(argv):
    """Whether the command line names a --flagfile (absl expands it before main sees argv)."""
    return any(arg.lstrip("-").split("=")[0] == "flagfile" for arg in argv[1:] if arg[:1] == "-")


def config_from_flags():
    return config_lib.Config(**{name: holder.value for name, holder in _FLAGS.items()})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags()
    if not config.workdir:
        raise app.UsageError("--workdir is required")
    if not _flagfile_given(sys.argv):
        print(f"invp_tf.train: error: {NO_FLAGFILE}", file=sys.stderr)
        sys.exit(1)
    message = finished_message(config.workdir, config.epochs)
    if message:
        print(message)
        return
    try:
        row = train_and_evaluate(config, config.workdir)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        logging.debug("stopped", exc_info=True)
        print(f"invp_tf.train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"invp_tf.train: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except tf.errors.UnavailableError as e:
        # A multi-worker peer died without SIGTERM: its collectives abort here.
        logging.debug("stopped", exc_info=True)
        reason = e.message.splitlines()[0][:300]
        print(
            f"invp_tf.train: error: lost a worker of the cluster ({reason}); restart every "
            "worker with the same command: they resume from the last checkpoint",
            file=sys.stderr,
        )
        sys.exit(1)
    print(json.dumps(row))


def run():
    """The `invp-train` console command (setup.py entry point)."""
    app.run(main)


if __name__ == "__main__":
    run()
