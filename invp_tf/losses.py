"""The losses of Invariance Propagation (README, "The method, as implemented"), as pure functions.

For an anchor i with embedding v_i and bank rows bank[j], s_ij = <v_i, bank[j]> / tau:

    L_ins(i) = logsumexp_{j in TopM(i) U {i}} s_ij - s_ii                       (Eq. 4)
    L_inv(i) = logsumexp_{n in B(i)} s_in - logsumexp_{p in H(i)} s_ip          (Eq. 5)

N(i) are the positives propagated through the kNN graph, H(i) the P of them with the lowest
s_ij, TopM(i) the M bank rows most similar to v_i (found by `topm.search`), and B(i) the
background: TopM(i) minus {i} ("approx", the authors' practice) or (TopM(i) minus N(i)
minus {i}) union H(i) ("exact", the paper's Eq. 4-5).

Everything is in log-sum-exp form over float32 logits: exp(1 / 0.07) overflows float16, so
embeddings are cast to float32 first even under a mixed-precision policy. Nothing here
reads flags or writes state: the bank and the graph are inputs, and the train step calls
this same function.
"""

import dataclasses

import tensorflow as tf

from invp_tf import propagation
from invp_tf import topm

BACKGROUNDS = ("approx", "exact")
POSITIVE_MODES = ("propagation", "knn")
BACKGROUND_SEARCHES = topm.METHODS


def _setting(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The settings of `invp_losses`, one typed object from the flags to the model to the loss.

    Each field is a flag of `invp_tf.train` (`config.Config` extends this class) and a keyword
    argument of `invp_losses` of the same name. Defaults: the paper's ImageNet recipe.
    """

    temperature: float = _setting(0.07, "Softmax temperature tau.")
    num_layers: int = _setting(3, "Propagation hops l.")
    num_positives: int = _setting(50, "Hard positives P kept from the propagated set.")
    num_background: int = _setting(4096, "Hard negatives M: the TopM background rows.")
    background: str = _setting(
        "approx", "Background of L_inv: approx (authors) or exact (Eq. 4-5)."
    )
    background_search: str = _setting(
        "exact",
        "How TopM is found: exact (top_k's set: a native kernel on CPU-only machines, else "
        "a bracketed threshold and a top_k over a few rows), top_k (tf.math.top_k over the "
        "bank: the same losses, slower) or sampled (rows above a threshold read off a bank "
        "sample, losses within about 1e-3). From N >= 64 M, exact and sampled score the bank "
        "in chunks.",
    )
    positive_mode: str = _setting(
        "propagation", "Positives by propagation, or plain kNN (ablation)."
    )
    num_knn_positives: int = _setting(0, "K of positive_mode=knn (0 = k + k^2 + ... + k^l).")
    hard_positives: bool = _setting(True, "Keep the P hardest positives (False: all of N(i)).")
    hard_negatives: bool = _setting(True, "TopM background (False: the whole bank).")

    def losses(self, embeddings, indices, bank, knn_graph):
        """`invp_losses` with these settings: (instance [B], invariance [B])."""
        return invp_losses(
            embeddings,
            indices,
            bank,
            knn_graph,
            temperature=self.temperature,
            num_background=self.num_background,
            num_layers=self.num_layers,
            num_positives=self.num_positives,
            background=self.background,
            positive_mode=self.positive_mode,
            hard_positives=self.hard_positives,
            hard_negatives=self.hard_negatives,
            num_knn_positives=self.num_knn_positives or None,
            background_search=self.background_search,
        )


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


def _hardest(embeddings, bank, members, temperature, num_positives):
    """(s_ip [B, P], valid [B, P]) of H(i): the `num_positives` members of N(i) with the
    lowest s_ij, or all of N(i) when it has no more (or num_positives is None).

    s_ij from the members' bank rows, not gathered from [B, N] logits: a gather's gradient
    would be one more dense [B, N] tensor to add up.
    """
    member_valid = members >= 0  # [B, S]
    member_rows = tf.gather(bank, tf.maximum(members, 0))  # [B, S, D]
    member_logits = tf.einsum("bd,bsd->bs", embeddings, member_rows) / temperature  # [B, S]
    if num_positives is None or num_positives >= members.shape[1]:
        return member_logits, member_valid
    hard_logits, _, hard_valid = propagation.hardest_members(
        member_logits, member_valid, num_positives
    )
    return hard_logits, hard_valid


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
    background_search="exact",
):
    """Per-example instance and invariance losses, L_ins(i) and L_inv(i) (Eq. 4-5).

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
      background_search: how TopM(i) is found, one of `topm.METHODS` (see invp_tf/topm.py):
        "exact" (tf.math.top_k's set, the default), "top_k" or "sampled" (approximate).

    Returns:
      (instance [B], invariance [B]) float32. invariance is 0 for an anchor
      without any positive.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)  # [B, D] v_i
    bank = tf.stop_gradient(tf.cast(bank, tf.float32))  # [N, D]
    indices = tf.cast(indices, tf.int32)  # [B] i
    knn_graph = tf.cast(knn_graph, tf.int32)  # [N, k]
    # TopM(i) minus {i}: its logsumexp [B], and the set (M = N without hard negatives).
    top = topm.search(
        embeddings,
        bank,
        indices,
        temperature=temperature,
        num_background=num_background if hard_negatives else None,
        method=background_search,
        keep_logits=positive_mode == "knn",  # the knn ablation ranks all of [B, N]
    )
    # s_ii from the bank row (a gather from [B, N] logits would add a dense [B, N] gradient).
    self_logit = tf.einsum("bd,bd->b", embeddings, tf.gather(bank, indices)) / temperature
    # N(i): [B, S] bank rows padded with -1; H(i): the s_ip of its P hardest members [B, P].
    members = positive_candidates(
        top.logits,
        indices,
        knn_graph,
        num_layers=num_layers,
        positive_mode=positive_mode,
        num_knn_positives=num_knn_positives,
        deduplicate=deduplicate,
    )
    num_hard = num_positives if hard_positives else None  # None: H(i) = N(i), the ablation
    hard_logits, hard_valid = _hardest(embeddings, bank, members, temperature, num_hard)
    lse_positive = topm.masked_logsumexp(hard_logits, hard_valid)  # [B]
    # Eq. 4: L_ins = logsumexp over TopM(i) U {i} (a set: i counted once) - s_ii.
    instance = tf.reduce_logsumexp(tf.stack([top.lse, self_logit], axis=1), axis=1) - self_logit
    # Eq. 5: L_inv = logsumexp over the background B(i) - logsumexp over H(i).
    if background == "approx":
        lse_background = top.lse
    else:
        lse_rest = top.lse_without(members)  # TopM(i) minus N(i) minus {i}
        lse_background = tf.reduce_logsumexp(tf.stack([lse_rest, lse_positive], axis=1), axis=1)
    has_positive = tf.reduce_any(hard_valid, axis=1)
    invariance = tf.where(has_positive, lse_background - lse_positive, 0.0)
    return instance, invariance
