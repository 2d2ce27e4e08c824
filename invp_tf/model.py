"""InvPModel: the train step wiring of encoder, losses, memory bank and graph.

The loss math lives in `losses`, the bank state change in `memory_bank`, the
graph rebuild in `neighbors` (called between epochs by `train`). This module
only wires them: forward, loss, optimizer step, then the bank update.
"""

import keras
import tensorflow as tf

from invp_tf import losses
from invp_tf import memory_bank


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
        results["step_loss"] = loss  # this step's, for TensorBoard (train._StepSummaries)
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages step outputs over workers with reduce(MEAN, axis=0),
            # which fails on scalars: give them that axis (the result is a scalar).
            results = {name: value[tf.newaxis] for name, value in results.items()}
        return results
