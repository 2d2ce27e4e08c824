"""The losses of Invariance Propagation (DESIGN.md section 1), as pure functions.

Everything is in log-sum-exp form over float32 logits s_ij = <v_i, bank[j]> / tau:
exp(1 / 0.07) overflows float16, so embeddings are cast to float32 first even
under a mixed-precision policy. Nothing here reads flags or writes state: the
bank and the graph are inputs, and the train step calls this same function.
"""

import tensorflow as tf

from invp_tf import propagation

BACKGROUNDS = ("approx", "exact")
POSITIVE_MODES = ("propagation", "knn")
# Masked logits get a large finite value, not -inf: an all-masked row must not
# produce inf - inf = NaN in the forward pass or 0 * inf in the gradient.
_MASKED = -1e9


def _masked_logsumexp(logits, mask):
    """logsumexp over the entries where mask is True (about -1e9 for an empty row)."""
    return tf.reduce_logsumexp(tf.where(mask, logits, _MASKED), axis=-1)


def positive_candidates(
    logits,
    indices,
    knn_graph,
    *,
    num_layers,
    positive_mode,
    num_knn_positives=None,
    deduplicate=True,
):
    """Positive set N(i) of each anchor as [B, S] int32 rows padded with -1.

    Args:
      logits: [B, N] float32 s_ij; used only by positive_mode="knn".
      indices: [B] int32 anchor rows.
      knn_graph: [N, k] int32 graph over the bank.
      num_layers: propagation hops l.
      positive_mode: "propagation" (the method) or "knn" (ablation: the K bank
        rows most similar to v_i, minus i).
      num_knn_positives: K for "knn"; defaults to k + ... + k^l.
      deduplicate: False gives the authors' concatenated hop lists.
    """
    if positive_mode == "propagation":
        return propagation.propagate(knn_graph, indices, num_layers, deduplicate=deduplicate)
    if positive_mode != "knn":
        raise ValueError(f"positive_mode must be one of {POSITIVE_MODES}, got {positive_mode!r}")
    k = knn_graph.shape[1]
    num = num_knn_positives or propagation.max_set_size(k, num_layers)
    _, nearest = tf.math.top_k(logits, k=num + 1)  # [B, K+1], most similar first
    is_self = nearest == indices[:, None]
    # Drop the anchor if it is among the K+1; otherwise drop the (K+1)-th.
    keep_last = tf.reduce_any(is_self, axis=1, keepdims=True)
    last = tf.one_hot(num, num + 1, on_value=True, off_value=False)[None, :]
    drop = is_self | (last & ~keep_last)
    return tf.where(drop, tf.constant(propagation.PAD, tf.int32), nearest)


def invp_losses(
    embeddings,
    indices,
    bank,
    knn_graph,
    *,
    temperature,
    num_background,
    num_layers,
    num_positives,
    background="approx",
    positive_mode="propagation",
    hard_positives=True,
    hard_negatives=True,
    num_knn_positives=None,
    deduplicate=True,
):
    """Per-example instance and invariance losses, L_ins(i) and L_inv(i).

    Args:
      embeddings: [B, D] batch embeddings v_i (L2-normalised here; idempotent
        for unit rows). Gradients flow through them only.
      indices: [B] int32/int64 bank rows of the batch.
      bank: [N, D] memory bank (unit rows); treated as a constant.
      knn_graph: [N, k] int kNN graph over the bank (self excluded).
      temperature: tau.
      num_background: M, size of TopM(i) (clipped to N).
      num_layers: l, propagation hops.
      num_positives: P, hard positives kept from N(i).
      background: "approx" (B(i) = TopM(i) minus i, the authors' practice) or
        "exact" (B(i) = (TopM(i) minus N(i) minus i) union H(i), paper Eq. 4-5).
      positive_mode: "propagation" or "knn" (Table 5 ablation).
      hard_positives: False uses H(i) = N(i) (Table 5 ablation).
      hard_negatives: False uses TopM(i) = all N rows (Table 5 ablation).
      num_knn_positives: K for positive_mode="knn".
      deduplicate: False uses the authors' concatenated (non-set) positives.

    Returns:
      (instance [B], invariance [B]) float32. invariance is 0 for an anchor
      without any positive.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)  # [B, D]
    bank = tf.stop_gradient(tf.cast(bank, tf.float32))  # [N, D]
    indices = tf.cast(indices, tf.int32)
    knn_graph = tf.cast(knn_graph, tf.int32)
    logits = tf.matmul(embeddings, bank, transpose_b=True) / temperature  # [B, N]
    num_rows = bank.shape[0]  # static N, or None inside a shape-polymorphic function

    # TopM(i): [B, M] logits and rows (M = N when N <= M). Without hard negatives,
    # or when M covers the bank, TopM is the whole bank and no sort is needed.
    if hard_negatives and (num_rows is None or num_background < num_rows):
        k = (
            num_background
            if num_rows is not None
            else tf.minimum(num_background, tf.shape(bank)[0])
        )
        top_logits, top_rows = tf.math.top_k(logits, k=k)
    else:
        top_logits = logits
        top_rows = tf.broadcast_to(
            tf.range(tf.shape(bank)[0], dtype=tf.int32)[None], tf.shape(logits)
        )
    self_logit = tf.gather(logits, indices, batch_dims=1)  # [B] s_ii
    is_self = top_rows == indices[:, None]  # [B, M]

    # L_ins = logsumexp over TopM(i) U {i} (a set: i counted once) - s_ii.
    lse_top = tf.reduce_logsumexp(top_logits, axis=1)
    lse_with_self = tf.reduce_logsumexp(tf.stack([lse_top, self_logit], axis=1), axis=1)
    instance = tf.where(tf.reduce_any(is_self, axis=1), lse_top, lse_with_self) - self_logit

    # N(i): [B, S] rows padded with -1, and their logits.
    members = positive_candidates(
        logits,
        indices,
        knn_graph,
        num_layers=num_layers,
        positive_mode=positive_mode,
        num_knn_positives=num_knn_positives,
        deduplicate=deduplicate,
    )
    member_valid = members >= 0
    member_logits = tf.gather(logits, tf.maximum(members, 0), batch_dims=1)  # [B, S]

    # H(i): the P members with the lowest s_ij (all of N(i) when |N(i)| <= P).
    num_members = members.shape[1]
    if hard_positives and num_positives < num_members:
        hard_logits, _, hard_valid = propagation.hardest_members(
            member_logits, member_valid, num_positives
        )  # [B, P]
    else:
        hard_logits, hard_valid = member_logits, member_valid
    lse_positive = _masked_logsumexp(hard_logits, hard_valid)

    if background == "approx":
        lse_background = _masked_logsumexp(top_logits, ~is_self)
    else:
        # Membership of each TopM row in N(i) by binary search in the sorted set.
        sorted_members = tf.sort(members, axis=1)  # [B, S], -1 padding first
        pos = tf.searchsorted(sorted_members, top_rows)  # [B, M]
        found = tf.gather(sorted_members, tf.minimum(pos, num_members - 1), batch_dims=1)
        in_members = found == top_rows
        lse_rest = _masked_logsumexp(top_logits, ~is_self & ~in_members)
        lse_background = tf.reduce_logsumexp(tf.stack([lse_rest, lse_positive], axis=1), axis=1)

    has_positive = tf.reduce_any(hard_valid, axis=1)
    invariance = tf.where(has_positive, lse_background - lse_positive, 0.0)
    return instance, invariance
