"""The memory bank: one EMA embedding per training image (the paper's Eq. 2 update)."""

import numpy as np
import tensorflow as tf


def random_unit_rows(num_rows, dim, seed):
    """[num_rows, dim] float32 rows drawn from a seeded Gaussian, L2-normalised."""
    rows = np.random.default_rng(seed).standard_normal((num_rows, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _gather_replicas(context, values):
    """[R * B, ...]: every replica's `values` [B, ...] in replica order, on every replica.

    An all-reduce of each replica's rows placed in its own slot of zeros (exact:
    x + 0 = x). `ReplicaContext.all_gather` would do the same, but under
    MultiWorkerMirroredStrategy it fails inside the step ("destinations can not
    be empty"); all-reduce works under every strategy. B must be the same on
    every replica (the train pipeline drops partial batches).
    """
    replicas = context.num_replicas_in_sync
    slot = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=values.dtype)  # [R]
    slot = tf.reshape(slot, [replicas] + [1] * values.shape.rank)  # [R, 1, ...]
    spread = slot * values[tf.newaxis]  # [R, B, ...], zeros outside this replica's slot
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, spread)
    return tf.reshape(total, tf.concat([[-1], tf.shape(values)[1:]], 0))


class MemoryBank(tf.Module):
    """bank[j] = EMA of the embedding of image j, kept on the unit sphere.

    The state change is one named method, `update`, separate from the loss math
    (the loss only reads `bank`). Under a tf.distribute strategy every replica
    gathers the global batch first and applies the same scatter update, so all
    replicas keep identical copies (a replica-local scatter silently diverges).
    """

    def __init__(self, num_examples, embedding_dim, momentum=0.5, seed=0, name="memory_bank"):
        """Args:
        num_examples: N, one row per training image.
        embedding_dim: D, the embedding dimension.
        momentum: m in bank[i] <- normalize(m * bank[i] + (1 - m) * v_i).
        seed: seed of the random unit-vector initial rows.
        """
        super().__init__(name=name)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        with self.name_scope:
            self.bank = tf.Variable(
                random_unit_rows(num_examples, embedding_dim, seed),
                trainable=False,
                name="bank",
                synchronization=tf.VariableSynchronization.ON_WRITE,
                aggregation=tf.VariableAggregation.NONE,
            )  # [N, D]

    @property
    def num_examples(self):
        return self.bank.shape[0]

    def update(self, indices, embeddings):
        """Moves the rows `indices` towards `embeddings` (rule 6); no gradient.

        Args:
          indices: [B] int rows of this replica's batch.
          embeddings: [B, D] embeddings of the batch (normalised here).
        """
        indices = tf.cast(indices, tf.int32)
        embeddings = tf.math.l2_normalize(tf.cast(tf.stop_gradient(embeddings), tf.float32), 1)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            # [B * replicas] and [B * replicas, D]: the global batch on every replica.
            indices = _gather_replicas(context, indices)
            embeddings = _gather_replicas(context, embeddings)
        old = tf.gather(self.bank, indices)  # [B, D]
        new = tf.math.l2_normalize(self.momentum * old + (1.0 - self.momentum) * embeddings, 1)
        self.bank.scatter_update(tf.IndexedSlices(new, indices))

    def assign(self, rows):
        """Replaces the whole bank (e.g. with embeddings of the current encoder)."""
        self.bank.assign(tf.math.l2_normalize(tf.cast(rows, tf.float32), axis=1))
