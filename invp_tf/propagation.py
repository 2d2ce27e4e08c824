"""Positive discovery: the set of nodes reachable from an anchor in the kNN graph.

N(i) is every node reachable from i in 1..l hops of the kNN graph, as a set (no
duplicates, never i itself). At most k + k^2 + ... + k^l members. Rows are padded
with -1 so the result is a dense [B, S] int32 tensor with a static S, which the
train step can gather from without host round trips.

The authors' PyTorch code concatenates the hop lists instead (duplicates kept,
the anchor may reappear after hop 1); `deduplicate=False` reproduces it so their
numbers can be checked.
"""

import functools

import numpy as np
import tensorflow as tf

PAD = -1
# Similarity given to padding when the lowest members are selected: far below
# any real s_ij (|s_ij| <= 1 / tau), finite so no inf - inf can appear.
_MASKED = -1e9


def max_set_size(num_neighbors, num_layers):
    """S = k + k^2 + ... + k^l, the width of a propagation row."""
    return sum(num_neighbors**hop for hop in range(1, num_layers + 1))


def propagate(knn_graph, indices, num_layers, deduplicate=True):
    """Positive sets N(i) for a batch of anchors.

    Args:
      knn_graph: [N, k] int tensor or array; row j lists the k nearest rows of j.
      indices: [B] int anchors (rows of the graph).
      num_layers: l >= 1, the number of propagation hops.
      deduplicate: True gives sets (the paper); False gives the authors'
        concatenation of hop lists, duplicates and anchor included.

    Returns:
      [B, S] int32, S = k + ... + k^l. With deduplicate=True each row holds the
      distinct members of N(indices[b]) first and -1 padding after (order of the
      members is unspecified); the anchor never appears.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    knn_graph = tf.cast(tf.convert_to_tensor(knn_graph), tf.int32)  # [N, k]
    indices = tf.cast(tf.convert_to_tensor(indices), tf.int32)  # [B]
    k = knn_graph.shape[1]  # static, so every row width below is static too
    frontier = indices[:, None]  # [B, 1]
    hops = []
    for hop in range(1, num_layers + 1):
        # [B, k^(h-1)] -> [B, k^(h-1), k] -> [B, k^h]
        frontier = tf.reshape(tf.gather(knn_graph, frontier), [-1, k**hop])
        hops.append(frontier)
    members = tf.concat(hops, axis=1)  # [B, S]
    if not deduplicate:
        return members
    # Sort each row so duplicates become adjacent, drop repeats and the anchor,
    # then sort descending to move the -1 padding to the end.
    members = tf.sort(members, axis=1)
    repeat = tf.concat(
        [tf.zeros_like(members[:, :1], tf.bool), members[:, 1:] == members[:, :-1]], axis=1
    )
    drop = repeat | (members == indices[:, None])
    members = tf.where(drop, tf.constant(PAD, tf.int32), members)
    return tf.sort(members, axis=1, direction="DESCENDING")


def propagate_all(knn_graph, num_layers, chunk_size=65_536):
    """N(i) of every node of the graph: the whole padded table, built in row chunks.

    Same sets as `propagate` (it is called on each chunk of anchors); memory is
    the [N, S] int32 table plus chunk_size x S per hop.

    Args:
      knn_graph: [N, k] int graph.
      num_layers: propagation hops l.
      chunk_size: anchors per call.

    Returns:
      [N, S] int32 numpy array, row i = N(i) padded with -1.
    """
    knn_graph = tf.convert_to_tensor(np.asarray(knn_graph, np.int32))  # [N, k]
    n, k = knn_graph.shape
    table = np.empty((n, max_set_size(k, num_layers)), np.int32)
    for start in range(0, n, chunk_size):
        anchors = tf.range(start, min(start + chunk_size, n))
        table[start : start + chunk_size] = _propagate_chunk(knn_graph, anchors, num_layers)
    return table


@functools.partial(tf.function, reduce_retracing=True)
def _propagate_chunk(knn_graph, anchors, num_layers):
    return propagate(knn_graph, anchors, num_layers)


def hardest_members(member_sims, member_valid, num_positives):
    """H(i): the `num_positives` valid members with the lowest similarity.

    Args:
      member_sims: [B, S] float s_ij of each member of N(i) (any value on padding).
      member_valid: [B, S] bool, False on -1 padding.
      num_positives: P.

    Returns:
      (sims [B, P'], positions [B, P'] into the S axis, valid [B, P']) with
      P' = min(P, S), lowest similarity first; valid is False where N(i) has
      fewer than P' members.
    """
    num = min(num_positives, member_sims.shape[1])
    lowest, positions = tf.math.top_k(tf.where(member_valid, -member_sims, _MASKED), k=num)
    return -lowest, positions, lowest > _MASKED / 2


def positive_purity(
    knn_graph, bank, labels, anchors, *, num_layers, num_positives, chunk_size=1024
):
    """How often the discovered positives share their anchor's label.

    Labels are only read here, to monitor training; they never reach the loss.
    H(i) is chosen as in training but with bank[i] standing in for v_i (this is
    computed between epochs, when there is no batch embedding).

    Args:
      knn_graph: [N, k] int graph.
      bank: [N, D] float memory bank.
      labels: [N] int labels (-1 = unknown: such anchors are skipped, such members
        count as another label).
      anchors: [A] int rows to measure.
      num_layers: propagation hops l.
      num_positives: P of H(i).
      chunk_size: anchors per step (memory chunk x S).

    Returns:
      dict with "purity_neighbors" (mean over anchors of the fraction of N(i)
      with the anchor's label), "purity_hard" (the same for H(i)) and
      "mean_positives" (mean |N(i)|).
    """
    labels = np.asarray(labels)
    anchors = np.asarray(anchors)
    anchors = anchors[labels[anchors] >= 0]
    bank = tf.convert_to_tensor(bank, tf.float32)
    sums = {"purity_neighbors": 0.0, "purity_hard": 0.0, "mean_positives": 0.0}
    for start in range(0, len(anchors), chunk_size):
        rows = anchors[start : start + chunk_size]
        members = propagate(knn_graph, rows, num_layers)  # [A, S], -1 padded
        valid = members >= 0
        safe = tf.maximum(members, 0)
        sims = tf.einsum("ad,asd->as", tf.gather(bank, rows), tf.gather(bank, safe))  # [A, S]
        same = tf.gather(tf.constant(labels, tf.int32), safe) == labels[rows][:, None]
        same = tf.cast(same & valid, tf.float32)
        count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)  # |N(i)| >= 1
        sums["purity_neighbors"] += float(tf.reduce_sum(tf.reduce_sum(same, 1) / count))
        sums["mean_positives"] += float(tf.reduce_sum(count))
        # H(i): the P members with the lowest similarity (all of N(i) if fewer).
        _, position, hard_valid = hardest_members(sims, valid, num_positives)
        hard_valid = tf.cast(hard_valid, tf.float32)
        hard_same = tf.gather(same, position, batch_dims=1) * hard_valid
        sums["purity_hard"] += float(
            tf.reduce_sum(tf.reduce_sum(hard_same, 1) / tf.reduce_sum(hard_valid, 1))
        )
    return {name: value / max(len(anchors), 1) for name, value in sums.items()}
