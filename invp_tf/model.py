"""InvPModel: the train step wiring of encoder, losses, memory bank and graph.

The loss math lives in `losses`, the bank state change in `memory_bank`, the
graph rebuild in `neighbors` (called between epochs by `training`). This module
only wires them: forward, loss, optimizer step, then the bank update; and builds a
run's encoder and model from its `config.Config`.
"""

import keras
import tensorflow as tf

from invp_tf import encoder as encoder_lib
from invp_tf import losses
from invp_tf import memory_bank


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
        stem_width=config.stem_width,
        head_hidden_dim=config.head_hidden_dim,
        normalization=config.normalization,
    )


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


def model_from_config(config, num_examples, sync_batchnorm=False):
    """The uncompiled InvPModel of `config` over a bank of `num_examples` rows."""
    return InvPModel(
        encoder_from_config(config, sync_batchnorm=sync_batchnorm),
        num_examples,
        embedding_dim=config.embedding_dim,
        num_neighbors=config.num_neighbors,
        memory_momentum=config.memory_momentum,
        seed=config.seed,
        loss_config=config.loss,
    )


class InvPModel(keras.Model):
    """Encoder + memory bank + kNN graph, trained with `fit` one epoch at a time.

    State the epoch loop sets between epochs:
      knn_graph: [N, k] int32 variable, rebuilt from the bank.
      invariance_weight: lambda_inv * w(epoch), 0 before the ramp-up ends.
    """

    def __init__(
        self,
        encoder,
        num_examples,
        *,
        embedding_dim,
        num_neighbors=4,
        memory_momentum=0.5,
        seed=0,
        loss_config=None,
        **kwargs,
    ):
        """Args:
        encoder: a model whose call returns {"embedding": [B, D], ...}.
        num_examples: N, rows of the bank and the graph.
        embedding_dim: D.
        num_neighbors: k of the kNN graph.
        memory_momentum: m of the bank update.
        seed: seed of the bank's initial random unit rows.
        loss_config: the loss's settings (`losses.LossConfig`; None: its defaults).
        """
        super().__init__(**kwargs)
        self.encoder = encoder
        self.memory_bank = memory_bank.MemoryBank(
            num_examples, embedding_dim, momentum=memory_momentum, seed=seed
        )
        self.knn_graph = tf.Variable(
            tf.zeros([num_examples, num_neighbors], tf.int32), trainable=False, name="knn_graph"
        )
        self.invariance_weight = tf.Variable(0.0, trainable=False, name="invariance_weight")
        # Train steps run. The optimizer's `iterations` misses the steps a
        # mixed-precision LossScaleOptimizer skips (overflowing gradients), so
        # epochs and resumption count these.
        self.steps = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="steps",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.loss_config = loss_config or losses.LossConfig()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.instance_tracker = keras.metrics.Mean(name="loss_ins")
        self.invariance_tracker = keras.metrics.Mean(name="loss_inv")

    @property
    def metrics(self):
        # Listed so that fit() resets them each epoch and reports them.
        return [self.loss_tracker, self.instance_tracker, self.invariance_tracker]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy, Keras's fit pulls a first batch and all-reduces it to
        # build layers symbolically; it fails on the per-replica batch of
        # MultiWorkerMirroredStrategy. The train step needs no symbolic build (no
        # compiled loss or metrics; the encoder is built before fit), as on one
        # device, where Keras skips it too.
        return None

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def compute_losses(self, embeddings, indices):
        """(instance [B], invariance [B]) from `losses.invp_losses`, the one code path.

        Before the first graph exists the invariance term is computed on the
        placeholder graph and weighted 0: cheaper to keep than a tf.cond, which
        would also make TF's type inference warn at every trace.
        """
        return self.loss_config.losses(embeddings, indices, self.memory_bank.bank, self.knn_graph)

    def train_step(self, data):
        images, indices, _ = data  # [B, H, W, 3], [B], [B]
        with tf.GradientTape() as tape:
            embeddings = self.encoder(images, training=True)["embedding"]  # [B, D]
            instance, invariance = self.compute_losses(embeddings, indices)
            loss = tf.reduce_mean(instance) + self.invariance_weight * tf.reduce_mean(invariance)
            # The optimizer sums gradients over replicas: scale so N replicas with
            # global batch B match one device with batch B.
            scaled_loss = loss / tf.distribute.get_strategy().num_replicas_in_sync
            # Identity, except under mixed_float16 (a LossScaleOptimizer, which
            # unscales the gradients again in apply_gradients).
            scaled_loss = self.optimizer.scale_loss(scaled_loss)
        variables = self.encoder.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        # After the optimizer step, as in rule 6 (the loss read the old rows).
        self.memory_bank.update(indices, embeddings)
        self.steps.assign_add(1)
        self.loss_tracker.update_state(loss)
        self.instance_tracker.update_state(tf.reduce_mean(instance))
        # Reported as 0 while unused: the placeholder graph's value means nothing.
        in_use = tf.cast(self.invariance_weight > 0.0, tf.float32)
        self.invariance_tracker.update_state(in_use * tf.reduce_mean(invariance))
        results = {m.name: m.result() for m in self.metrics}
        results["step_loss"] = loss  # this step's, for TensorBoard (rundir.RunDir.step_summaries)
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages step outputs over workers with reduce(MEAN, axis=0),
            # which fails on scalars: give them that axis (the result is a scalar).
            results = {name: value[tf.newaxis] for name, value in results.items()}
        return results
