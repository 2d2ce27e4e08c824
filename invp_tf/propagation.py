"""Positive discovery: the set of nodes reachable from an anchor in the kNN graph.

N(i) is every node reachable from i in 1..l hops of the kNN graph, as a set (no
duplicates, never i itself). At most k + k^2 + ... + k^l members. Rows are padded
with -1 so the result is a dense [B, S] int32 tensor with a static S, which the
train step can gather from without host round trips.

The authors' PyTorch code concatenates the hop lists instead (duplicates kept,
the anchor may reappear after hop 1); `deduplicate=False` reproduces it so their
numbers can be checked.
"""

import tensorflow as tf

PAD = -1


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
