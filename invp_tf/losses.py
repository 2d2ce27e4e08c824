"""The losses of Invariance Propagation (README, "The method, as implemented"), as pure functions.

Everything is in log-sum-exp form over float32 logits s_ij = <v_i, bank[j]> / tau:
exp(1 / 0.07) overflows float16, so embeddings are cast to float32 first even
under a mixed-precision policy. Nothing here reads flags or writes state: the
bank and the graph are inputs, and the train step calls this same function.

TopM(i) is found exactly, as the very set tf.math.top_k returns, either by
bracketing the M-th largest s_ij and resolving it among the few rows next to it
(background_search="exact", the default: a native kernel on machines without a
GPU or TPU, TensorFlow ops elsewhere) or by tf.math.top_k over the [B, N]
similarities ("top_k", the definition written out, and most of the train step's
cost on a CPU); or approximately, as every row above a threshold read off a
sample of the bank, count-corrected to M rows ("sampled"). For large N / M the
exact and the sampled search score the bank in chunks and never hold [B, N].
"""

import math

import numpy as np
import tensorflow as tf

from invp_tf import kernels
from invp_tf import propagation

BACKGROUNDS = ("approx", "exact")
POSITIVE_MODES = ("propagation", "knn")
# How TopM(i) is found. "exact": the set of tf.math.top_k(s_i, M), ties included,
# from a bracketed threshold: the native kernel, or counts and a top_k over the few
# rows next to it (see _exact_top_mask); in bank chunks for large N / M
# (_exact_compact_background). "sampled": every row at or above the M-th largest s_ij of a
# strided sample of the columns, count-corrected to M rows (_sampled_background).
# "top_k": tf.math.top_k over all N bank rows, the reference the exact search is
# tested against.
BACKGROUND_SEARCHES = ("exact", "sampled", "top_k")
# The sampled search strides the bank rows so that the threshold is about the
# _SAMPLED_RANK-th largest entry of the sample: M / stride = _SAMPLED_RANK.
_SAMPLED_RANK = 128
# From N >= _COMPACT_MIN_RATIO * M on (propagation positives, outside XLA), the
# sampled and the exact search never hold [B, N] similarities: they score the bank in
# chunks of _CHUNK_ROWS rows and keep the entries above a threshold as a flat list
# (about B * M of them, B * 1.4 M for the exact one's lower bound); the gradient
# gathers the bank rows of TopM instead of a dense [B, N] x [N, D] matmul. (The one
# exception: a batch in which the exact search's sample misled a row lists that row
# whole, N entries; at four standard deviations that is rare.)
_COMPACT_MIN_RATIO = 64
_CHUNK_ROWS = 16_384
# The exact search brackets the M-th value from the sampled search's sample,
# moves the bracket by _EXACT_INTERPOLATIONS exact counts (up to
# _EXACT_EXTRA_INTERPOLATIONS more while a row is still outside reach), and resolves
# the last rows with a top_k of _EXACT_CANDIDATES (see _exact_top_mask).
_EXACT_INTERPOLATIONS = 3
_EXACT_EXTRA_INTERPOLATIONS = 3
_EXACT_CANDIDATES = 96
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


def _count_corrected(lse, count, target, threshold):
    """log(sum_set e^s + (target - count) e^t): a set of `count` entries at or above
    t, taken as the `target` largest, the surplus or deficit sitting at t.

    Exact when t is the exact target-th value (count = target, barring ties); a
    second-order error otherwise. All arguments [B]; threshold has no gradient.
    """
    extra = target - count
    added = tf.reduce_logsumexp(
        tf.stack([lse, threshold + tf.math.log(tf.maximum(extra, 1.0))], axis=1), axis=1
    )
    # sum_set e^s >= count e^t, so the factor stays > 0; clipped anyway, so that no
    # branch of the tf.where below has an infinite gradient.
    removed = lse + tf.math.log1p(
        tf.maximum(tf.minimum(extra, 0.0) * tf.exp(tf.minimum(threshold - lse, 0.0)), -1 + 1e-6)
    )
    corrected = tf.where(extra > 0, added, tf.where(extra < 0, removed, lse))
    return tf.where(target > 0, corrected, _MASKED)


@tf.custom_gradient
def _sum_exp(logits, mask):
    """log sum_{mask} e^s per row ([B, N] -> [B]; _MASKED for an empty row), in few passes.

    tf.reduce_logsumexp over tf.where(mask, ...) makes about twice as many [B, N]
    passes (its own max, and a softmax recomputed in the gradient). The shift is
    the row max of all logits: |s| <= 1 / tau, so exp(s - shift) underflows only
    when every masked entry sits more than 87 below it (tau < 0.023 at least).
    """
    shift = tf.reduce_max(logits, axis=1, keepdims=True)  # [B, 1]
    exps = tf.where(mask, tf.exp(logits - shift), 0.0)  # [B, N]
    total = tf.reduce_sum(exps, axis=1)  # [B]
    nonempty = total > 0
    safe_total = tf.where(nonempty, total, 1.0)

    def grad(upstream):
        return exps * (upstream / safe_total)[:, None], None

    return tf.where(nonempty, tf.math.log(safe_total) + shift[:, 0], _MASKED), grad


def _count(mask):
    """[B, N] bool -> [B] float32 count of True (half the time of tf.math.count_nonzero)."""
    return tf.cast(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1), tf.float32)


def _count_above(logits, threshold):
    """[B] int32 count of logits[b, :] > threshold[b] ([B, N] and [B] float32).

    Summed as int8 in groups of up to 127 columns first: the same count as an
    int32 sum, with a quarter of its memory traffic (each count is a pass over
    all of [B, N]; the exact search takes 2 + _EXACT_INTERPOLATIONS of them).
    """
    num_rows = logits.shape[1]
    group = max(d for d in range(1, 128) if num_rows % d == 0)
    if group < 16:  # N with no divisor in [16, 127]: the plain int32 sum
        return tf.reduce_sum(tf.cast(logits > threshold[:, None], tf.int32), axis=1)
    above = tf.cast(logits > threshold[:, None], tf.int8)  # [B, N]
    partial = tf.reduce_sum(tf.reshape(above, [-1, num_rows // group, group]), axis=2)
    return tf.reduce_sum(tf.cast(partial, tf.int32), axis=1)


def _sample_plan(num_background, num_rows):
    """(stride, sample size, rank, margin) of the searches' strided sample of N columns.

    Every stride-th column (stride M / _SAMPLED_RANK), so a row's M-th largest value
    is about the rank-th of its sample; margin is four standard deviations of that
    rank's error, plus 2, in sample ranks (the exact searches' bracket).
    """
    stride = max(1, num_background // _SAMPLED_RANK)
    sample_size = -(-num_rows // stride)  # the columns of [:, ::stride]
    rank = min(max(1, round(num_background * sample_size / num_rows)), sample_size)
    return stride, sample_size, rank, math.ceil(4 * math.sqrt(rank)) + 2


def _exact_bracket(logits, num_background, candidates):
    """(hi [B], need [B] int32, hit [] bool): where the M-th largest logit of each row sits.

    Fewer than M logits of row b lie above hi[b]; TopM is those plus the
    need[b] = M - #{s_bj > hi[b]} largest at or below hi[b], which is 1..C
    (C = candidates) in every row when hit. Found with counts, no sort:

    1. From the top values of every (M / 128)-th column (the sampled search's
       sample), hi with fewer than M logits above it and lo with at least M:
       four standard deviations of the sample's rank error either side of the
       M-th value, both counted exactly.
    2. _EXACT_INTERPOLATIONS times: t interpolated linearly between lo and hi
       towards M - C/2 logits above it, counted exactly; t becomes the new hi
       (fewer than M above) or the new lo. On random and clustered banks three
       of them left need within 21..72 of C = 96 in all of 1,024 rows each
       (batches of noisy bank rows; N = 20k, M = 2048 and N = 60k, M = 4096):
       median 49-51, standard deviation 4-6.
    3. While need is outside 1..C in some row, up to _EXACT_EXTRA_INTERPOLATIONS
       more (a tf.while_loop: a batch that hit pays one test of its condition).
       Trained banks are not random ones: on the memory bank of a trained
       20k-image Fashion-MNIST run (M = 2048), 4 of 30 batches of 128 of its rows
       still missed after three interpolations and paid the whole top_k over N;
       none did with step 3 (benchmarks/exact_bracket.py).

    Args:
      logits: [B, N] float32, static N > num_background.
      num_background: M.
      candidates: C.
    """
    stride, sample_size, rank, margin = _sample_plan(num_background, logits.shape[1])
    sample = logits[:, ::stride]  # [B, ns] every stride-th column
    depth = min(sample_size, rank + margin)
    values = tf.math.top_k(sample, k=depth).values  # [B, depth], descending
    hi = values[:, rank - margin - 1] if rank > margin else values[:, 0] + 1.0  # [B]
    lo = values[:, depth - 1] if rank + margin <= sample_size else values[:, -1] - 1.0
    above_hi, above_lo = _count_above(logits, hi), _count_above(logits, lo)  # [B] int32
    target = num_background - min(candidates, num_background) // 2

    def interpolate(lo, hi, above_lo, above_hi):
        fraction = tf.cast(above_lo - target, tf.float32) / tf.cast(
            tf.maximum(above_lo - above_hi, 1), tf.float32
        )
        threshold = lo + (hi - lo) * tf.clip_by_value(fraction, 0.0, 1.0)
        above = _count_above(logits, threshold)
        lower = above >= num_background  # still at least M above: a new lo
        lo, above_lo = tf.where(lower, threshold, lo), tf.where(lower, above, above_lo)
        hi, above_hi = tf.where(lower, hi, threshold), tf.where(lower, above_hi, above)
        return lo, hi, above_lo, above_hi

    def hit(lo, hi, above_lo, above_hi):
        need = num_background - above_hi
        return tf.reduce_all((above_lo >= num_background) & (need >= 1) & (need <= candidates))

    state = (lo, hi, above_lo, above_hi)
    for _ in range(_EXACT_INTERPOLATIONS):
        state = interpolate(*state)
    _, state = tf.while_loop(
        lambda i, state: (i < _EXACT_EXTRA_INTERPOLATIONS) & ~hit(*state),
        lambda i, state: (i + 1, interpolate(*state)),
        (tf.constant(0), state),
    )
    _, hi, _, above_hi = state
    return hi, num_background - above_hi, hit(*state)


def _exact_top_mask(logits, num_background, excluded):
    """[B, N] bool: row b holds the M columns of tf.math.top_k(logits[b], M) but excluded[b].

    That is the M largest s_bj and, among columns tied at the M-th value, the
    lower column indices (top_k's rule), found without a top_k over N.

    On a machine without a GPU or TPU and outside XLA, the native kernel
    `InvpTopMask` (invp_tf/top_mask.cc, built by invp_tf/kernels.py) finds it in
    one pass per row. Elsewhere, or where the kernel cannot be built, TensorFlow
    ops find the same set (tests/losses_test.py runs both): the
    logits above hi of `_exact_bracket` are all in; the other need are the need
    largest at or below hi, which a top_k of C over the row with the logits
    above hi masked out gives in top_k's own order (value, then lower column).
    The anchor's column excluded[b] is cleared in the same scatter.

    When the bracket still missed in some row after every interpolation (need
    outside 1..C: more than about C logits tie at the M-th value, as in a collapsed
    or quantised bank, or the counts converged too slowly), the whole batch takes
    tf.math.top_k over N instead
    (tf.cond, so shapes stay static for XLA). Either way the set is a function
    of the logits alone: the sample and the interpolation only decide the cost.

    Args:
      logits: [B, N] float32 s_ij, static N > num_background.
      num_background: M.
      excluded: [B] int32 column cleared in each row.
    """
    logits = tf.stop_gradient(logits)
    native = _native_ops()
    if native is not None:
        return native.invp_top_mask(logits, tf.cast(excluded, tf.int32), k=num_background)
    candidates = min(_EXACT_CANDIDATES, logits.shape[1])
    hi, need, hit = _exact_bracket(logits, num_background, candidates)
    above = logits > hi[:, None]  # [B, N], all in TopM
    near, columns = tf.math.top_k(tf.where(above, -np.inf, logits), k=candidates)  # [B, C]
    # A -inf candidate is a logit above hi (C > logits at or below hi): it stays in.
    keep = (tf.range(candidates)[None, :] < need[:, None]) | (near == -np.inf)
    keep &= columns != excluded[:, None]
    # One scatter: each candidate kept or not, and the excluded column cleared (if
    # it is a candidate too, both of its updates are False).
    batch = tf.shape(logits)[0]
    rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(columns))
    own = tf.stack([tf.range(batch), excluded], axis=1)  # [B, 2]
    positions = tf.concat([tf.reshape(tf.stack([rows, columns], axis=-1), [-1, 2]), own], 0)
    updates = tf.concat([tf.reshape(keep, [-1]), tf.zeros([batch], tf.bool)], 0)

    def whole_rows():
        _, top = tf.math.top_k(logits, k=num_background, sorted=False)  # [B, M]
        top_rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(top))
        top = tf.scatter_nd(
            tf.reshape(tf.stack([top_rows, top], axis=-1), [-1, 2]),
            tf.ones([tf.size(top)], tf.bool),
            tf.shape(logits),
        )
        return tf.tensor_scatter_nd_update(top, own, tf.zeros([batch], tf.bool))

    return tf.cond(hit, lambda: tf.tensor_scatter_nd_update(above, positions, updates), whole_rows)


def _native_ops():
    """kernels.native_ops() where they apply, else None (TensorFlow ops).

    They apply on a machine without a GPU or TPU, outside XLA: they are CPU kernels, and
    on an accelerator the similarities would travel to the host and back every step.
    """
    if _in_xla_context():
        return None
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None
    return kernels.native_ops()


def _in_xla_context():
    """True while tracing for XLA, which needs static shapes (no tf.where)."""
    try:
        from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except (ImportError, AttributeError):  # private API moved: the dense path always works
        return True


def _sampled_threshold(embeddings, bank, temperature, num_background):
    """(t_i [B], the bank row holding t_i [B]): about the M-th largest s_ij.

    Read off every stride-th bank row: the sample's top M * (sample size / N)
    entries end at t_i, a top-k over N / stride columns (M / stride =
    _SAMPLED_RANK of them) instead of M over N. No gradient: the count correction
    stands in for rows near t_i, not for this row (with its gradient, the
    gradient of the trained-bank case in BENCHMARKS.md is 6x further from exact).
    """
    stride, _, rank, _ = _sample_plan(num_background, bank.shape[0])
    sample = tf.matmul(embeddings, bank[::stride], transpose_b=True) / temperature
    values, columns = tf.math.top_k(tf.stop_gradient(sample), k=rank)
    return values[:, -1], columns[:, -1] * stride


def _list_entries(embeddings, bank, threshold, temperature):
    """The s_ij > t_i as flat lists (row, column, value, position [C]; count [B]), no gradient.

    The bank is scored _CHUNK_ROWS rows at a time, so [B, N] is never held. Within
    a row the entries come in column order; position is an entry's place among
    its row's, count the entries of every row. Each chunk is listed by the native
    `InvpListAbove` (one read of the chunk) where it runs, else by TensorFlow ops
    (the same lists in the same order).
    """
    batch = tf.shape(embeddings)[0]
    rows, columns, values, positions = [], [], [], []
    count = tf.zeros([batch], tf.int32)
    frozen = tf.stop_gradient(embeddings)
    native = _native_ops()
    for start in range(0, bank.shape[0], _CHUNK_ROWS):
        chunk = tf.matmul(frozen, bank[start : start + _CHUNK_ROWS], transpose_b=True)
        chunk /= temperature  # [B, c]
        if native is not None and chunk.dtype == tf.float32:
            row, column, value, position, count = native.invp_list_above(
                chunk, threshold, count, start
            )
            for parts, part in zip(
                (rows, columns, values, positions), (row, column, value, position), strict=True
            ):
                parts.append(part)
            continue
        where = tf.where(chunk > threshold[:, None])  # [C_c, 2] int64, rows ascending
        row = tf.cast(where[:, 0], tf.int32)
        in_chunk = tf.math.unsorted_segment_sum(tf.ones_like(row), row, batch)  # [B]
        first = tf.cumsum(in_chunk, exclusive=True)  # where each row starts in this chunk
        positions.append(tf.range(tf.size(row)) - tf.gather(first, row) + tf.gather(count, row))
        count += in_chunk
        rows.append(row)
        columns.append(tf.cast(where[:, 1], tf.int32) + start)
        values.append(tf.gather_nd(chunk, where))
    row, column, value, position = (
        tf.concat(parts, axis=0) for parts in (rows, columns, values, positions)
    )
    return row, column, value, position, count


def _attach_gradient(embeddings, bank, row, column, values, temperature):
    """values (s_ij of listed entries, no gradient) with their gradient to embeddings.

    The gradient gathers the C bank rows of the entries (one [C, D] pass) instead
    of a dense [B, N] x [N, D] matmul, the cheaper the larger N / C.
    """

    @tf.custom_gradient
    def attach(embeddings):
        def grad(upstream):  # [C] -> [B, D]: sum_c upstream_c * bank[column_c] / tau
            rows_of_bank = tf.gather(bank, column)  # [C, D]
            return (
                tf.math.unsorted_segment_sum(
                    upstream[:, None] * rows_of_bank, row, tf.shape(embeddings)[0]
                )
                / temperature
            )

        return tf.identity(values), grad

    return attach(embeddings)


def _entries_above(embeddings, bank, threshold, temperature):
    """The s_ij > t_i as flat lists (row [C], column [C], value [C]), C about B * M.

    The values carry their gradient (`_attach_gradient`).
    """
    row, column, values, _, _ = _list_entries(embeddings, bank, threshold, temperature)
    return row, column, _attach_gradient(embeddings, bank, row, column, values, temperature)


def _in_members(members, row, column, num_rows):
    """[C] bool: column c of entry c is in N(row c). members: [B, S] int32, -1 padded.

    Binary search in the sorted row * N + column keys of the members.
    """
    batch = tf.shape(members)[0]
    members, row, column = (tf.cast(x, tf.int64) for x in (members, row, column))
    keys = tf.where(  # int64: B * N passes 2^31 at B = 1,677 for N = 1.28M
        members >= 0, tf.range(tf.cast(batch, tf.int64))[:, None] * num_rows + members, -1
    )
    keys = tf.sort(tf.reshape(keys, [-1]))  # [B * S]; padding -1 matches nothing
    queries = row * num_rows + column
    found = tf.gather(keys, tf.minimum(tf.searchsorted(keys, queries), tf.size(keys) - 1))
    return found == queries


def _exact_compact_background(
    embeddings, bank, indices, members, *, temperature, num_background, background
):
    """(lse over TopM(i) minus {i}, lse over TopM(i) minus N(i) minus {i} or None), chunked.

    TopM(i) is tf.math.top_k's set, found without holding [B, N]:

    1. lo: the sampled search's sample (every (M / 128)-th bank row), read four
       standard deviations of its rank error below the M-th value, so that at
       least M similarities lie above lo.
    2. The s_ij > lo listed in chunks (`_list_entries`, about 1.4 M per row),
       each row's in column order. A row with fewer than M (the sample misled)
       is listed again whole (lo = -inf): the set never depends on the sample.
    3. Each row's top M among its listed values (value, then lower column), but
       column i: the native `InvpListedTop` on the flat lists where it runs; else
       the values laid out densely ([B, most listed], -inf padded, in column order)
       and tf.math.top_k taken there.
    4. Only the M entries kept per row get a gradient (a [B * M, D] gather, as in
       the sampled search).

    Args:
      embeddings: [B, D] unit rows. bank: [N, D], static N. indices: [B] int32.
      members: [B, S] int32 N(i), -1 padded; used by background="exact" only.
    """
    batch = tf.shape(embeddings)[0]
    num_rows = bank.shape[0]
    stride, sample_size, rank, margin = _sample_plan(num_background, num_rows)
    frozen = tf.stop_gradient(embeddings)
    sample = tf.matmul(frozen, bank[::stride], transpose_b=True) / temperature  # [B, ns]
    depth = min(sample_size, rank + margin)
    lo = tf.math.top_k(sample, k=depth).values[:, -1]  # [B]
    if depth == sample_size:  # the whole sample: every row is listed
        lo = tf.fill([batch], -np.inf)
    listed = _list_entries(frozen, bank, lo, temperature)
    enough = listed[4] >= num_background  # [B]
    # The listing has no gradient (it gets one in `_attach_gradient`); stopped here too,
    # or the tape differentiates the tf.cond's branches (their chunked matmuls) for zeros.
    row, column, value, position, count = (
        tf.stop_gradient(x)
        for x in tf.cond(
            tf.reduce_all(enough),
            lambda: listed,
            lambda: _list_entries(frozen, bank, tf.where(enough, lo, -np.inf), temperature),
        )
    )
    native = _native_ops() if value.dtype == tf.float32 else None
    if native is not None:  # TopM - {i} as flat lists, row-major
        row, column, value = native.invp_listed_top(
            value, row, column, position, count, tf.cast(indices, tf.int32), k=num_background
        )
    else:
        place = tf.stack([row, position], axis=1)  # [C, 2]
        dense = tf.tensor_scatter_nd_update(
            tf.fill([batch, tf.reduce_max(count)], -np.inf), place, value
        )
        _, top = tf.math.top_k(dense, k=num_background)  # [B, M] places
        top_rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(top))
        chosen = tf.scatter_nd(
            tf.reshape(tf.stack([top_rows, top], axis=-1), [-1, 2]),
            tf.ones([tf.size(top)], tf.bool),
            tf.shape(dense),
        )
        keep = tf.gather_nd(chosen, place) & (column != tf.gather(indices, row))  # TopM - {i}
        kept = tf.where(keep)[:, 0]
        row, column, value = (tf.gather(x, kept) for x in (row, column, value))
    value = _attach_gradient(embeddings, bank, row, column, value, temperature)
    lse_top = _segment_sum_exp(value, tf.ones_like(row, tf.bool), row, batch)
    if background != "exact":
        return lse_top, None
    rest = ~_in_members(members, row, column, num_rows)
    return lse_top, _segment_sum_exp(value, rest, row, batch)


def _segment_sum_exp(values, mask, row, batch):
    """log sum_{mask} e^value per row of the flat entries ([C] -> [B]; _MASKED if empty)."""
    masked = tf.where(mask, values, _MASKED)
    shift = tf.stop_gradient(tf.math.unsorted_segment_max(masked, row, batch))  # [B]
    total = tf.math.unsorted_segment_sum(
        tf.where(mask, tf.exp(masked - tf.gather(shift, row)), 0.0), row, batch
    )
    nonempty = total > 0
    safe_total = tf.where(nonempty, total, 1.0)
    return tf.where(nonempty, tf.math.log(safe_total) + shift, _MASKED)


def _sampled_background(
    embeddings,
    bank,
    logits,
    indices,
    self_logit,
    *,
    members,
    temperature,
    num_background,
    background,
):
    """(lse over TopM(i) minus {i}, lse over TopM(i) minus N(i) minus {i} or None).

    TopM(i) = {j : s_ij > t_i} plus the row at t_i, t_i from `_sampled_threshold`,
    count-corrected to M entries (ties at t_i, e.g. a collapsed bank, count at t_i).
    With `logits` [B, N] the sums are masked [B, N] reductions (XLA fuses them);
    without, they run over the flat entries of `_entries_above`.

    Args:
      embeddings: [B, D] unit rows. bank: [N, D], static N. logits: [B, N] or None.
      indices: [B] int32. self_logit: [B] s_ii.
      members: [B, S] int32 N(i), -1 padded; used by background="exact" only.
    """
    batch = tf.shape(embeddings)[0]
    num_rows = bank.shape[0]
    threshold, threshold_row = _sampled_threshold(embeddings, bank, temperature, num_background)
    # TopM(i) is the entries > t_i plus the row at t_i; i takes one of its M places
    # (also when tied with t_i: the choice among equal rows is arbitrary anyway).
    self_in_top = (self_logit >= threshold) | (threshold_row == indices)
    target = num_background - tf.cast(self_in_top, tf.float32)
    if logits is None:
        row, column, values = _entries_above(embeddings, bank, threshold, temperature)
        top_mask = column != tf.gather(indices, row)  # [C]

        def sum_exp_and_count(mask):
            count = tf.math.unsorted_segment_sum(tf.cast(mask, tf.float32), row, batch)
            return _segment_sum_exp(values, mask, row, batch), count

        if background == "exact":
            rest_mask = top_mask & ~_in_members(members, row, column, num_rows)
    else:
        # Entries > t_i, then the anchor's own column cleared (B scattered writes,
        # cheaper than a [B, N] comparison with the column index).
        self_positions = tf.stack([tf.range(batch), indices], axis=1)  # [B, 2]
        top_mask = tf.tensor_scatter_nd_update(
            logits > threshold[:, None], self_positions, tf.zeros([batch], tf.bool)
        )

        def sum_exp_and_count(mask):
            return _sum_exp(logits, mask), _count(mask)

        if background == "exact":
            rest_mask = _without_members(top_mask, members, indices)
    lse_top, count_top = sum_exp_and_count(top_mask)
    lse_top = _count_corrected(lse_top, count_top, target, threshold)
    if background != "exact":
        return lse_top, None
    lse_rest, count_rest = sum_exp_and_count(rest_mask)
    # Members of TopM leave it, and the target with them: those above t_i, and the
    # row at t_i if it is one (the authors' concatenated sets may hold i: not twice).
    boundary_member = tf.reduce_any(members == threshold_row[:, None], axis=1) & (
        threshold_row != indices
    )
    rest_target = target - (count_top - count_rest) - tf.cast(boundary_member, tf.float32)
    lse_rest = _count_corrected(lse_rest, count_rest, rest_target, threshold)
    return lse_top, lse_rest


def _without_members(mask, members, indices):
    """[B, N] `mask` with the columns of N(i) cleared in row i.

    members: [B, S] int32, -1 padded; the padding points at the anchor's own column,
    which every caller has already cleared.
    """
    rows = tf.broadcast_to(tf.range(tf.shape(members)[0])[:, None], tf.shape(members))
    columns = tf.where(members >= 0, members, indices[:, None])
    return tf.tensor_scatter_nd_update(
        mask,
        tf.reshape(tf.stack([rows, columns], axis=-1), [-1, 2]),
        tf.zeros([tf.size(members)], tf.bool),
    )


def _exact_background(logits, indices, members, *, num_background, background):
    """(lse over TopM(i) minus {i}, lse over TopM(i) minus N(i) minus {i} or None).

    TopM(i) is the set of tf.math.top_k (`_exact_top_mask`); the sums are masked
    [B, N] reductions, as in the sampled search, so no [B, M] gather is needed.

    Args:
      logits: [B, N] s_ij, static N > M. indices: [B] int32.
      members: [B, S] int32 N(i), -1 padded; used by background="exact" only.
    """
    top_mask = _exact_top_mask(logits, num_background, excluded=indices)  # TopM(i) - {i}
    lse_top = _sum_exp(logits, top_mask)
    if background != "exact":
        return lse_top, None
    return lse_top, _sum_exp(logits, _without_members(top_mask, members, indices))


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
    """Per-example instance and invariance losses, L_ins(i) and L_inv(i).

    Long (about 120 lines of code): the one path the train step and the tests both run, so
    every background and ablation branch stays in the same function (DESIGN section 2).

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
      background_search: how TopM(i) is found. "exact": tf.math.top_k's set
        (the definition) without a top_k over the bank: the native kernel on
        machines without a GPU or TPU, TensorFlow ops elsewhere
        (`_exact_top_mask`), from N >= 64 M in bank chunks
        (`_exact_compact_background`). "top_k": tf.math.top_k over the bank,
        written out. "sampled": the rows above a threshold read off every
        (M / 128)-th bank row, count-corrected to M rows; as fast as "exact"
        with the kernel at N = 20k and 60k, its loss 1.6x faster than exact's
        TensorFlow ops on a CPU; on the demo run's trained bank (N = 20k,
        M = 2048) the batch-mean losses were within 3e-4 of "exact", single anchors within
        4e-3, the gradient at cosine 0.99997 (BENCHMARKS.md). Runs as "exact"
        when the bank size is not static.

    Returns:
      (instance [B], invariance [B]) float32. invariance is 0 for an anchor
      without any positive.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if background_search not in BACKGROUND_SEARCHES:
        raise ValueError(
            f"background_search must be one of {BACKGROUND_SEARCHES}, got {background_search!r}"
        )
    embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)  # [B, D]
    bank = tf.stop_gradient(tf.cast(bank, tf.float32))  # [N, D]
    indices = tf.cast(indices, tf.int32)
    knn_graph = tf.cast(knn_graph, tf.int32)
    num_rows = bank.shape[0]  # static N, or None inside a shape-polymorphic function
    # M = N when N <= M: without hard negatives, or when M covers the bank, TopM is
    # the whole bank and no search is needed.
    searched = hard_negatives and (num_rows is None or num_background < num_rows)
    sampled = searched and background_search == "sampled" and num_rows is not None
    bracketed = searched and background_search == "exact" and num_rows is not None
    compact = (
        (sampled or bracketed)
        and positive_mode == "propagation"  # the knn ablation sorts all of [B, N]
        and num_rows >= _COMPACT_MIN_RATIO * num_background
        and not _in_xla_context()
    )
    logits = None  # the compact search never holds [B, N]
    if not compact:
        logits = tf.matmul(embeddings, bank, transpose_b=True) / temperature  # [B, N]

    # s_ii and the members' s_ij from their bank rows, not gathered from logits: a
    # gather's gradient would be one more dense [B, N] tensor to add up.
    self_logit = tf.einsum("bd,bd->b", embeddings, tf.gather(bank, indices)) / temperature

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
    member_rows = tf.gather(bank, tf.maximum(members, 0))  # [B, S, D]
    member_logits = tf.einsum("bd,bsd->bs", embeddings, member_rows) / temperature  # [B, S]

    # H(i): the P members with the lowest s_ij (all of N(i) when |N(i)| <= P).
    num_members = members.shape[1]
    if hard_positives and num_positives < num_members:
        hard_logits, _, hard_valid = propagation.hardest_members(
            member_logits, member_valid, num_positives
        )  # [B, P]
    else:
        hard_logits, hard_valid = member_logits, member_valid
    lse_positive = _masked_logsumexp(hard_logits, hard_valid)

    # TopM(i) minus {i} as one logsumexp (lse_top), and for the exact background
    # TopM(i) minus N(i) minus {i} (lse_rest).
    if sampled:
        lse_top, lse_rest = _sampled_background(
            embeddings,
            bank,
            logits,
            indices,
            self_logit,
            members=members,  # by name: background="exact" alone reads it
            temperature=temperature,
            num_background=num_background,
            background=background,
        )
    elif bracketed and compact:
        lse_top, lse_rest = _exact_compact_background(
            embeddings,
            bank,
            indices,
            members,
            temperature=temperature,
            num_background=num_background,
            background=background,
        )
    elif bracketed:
        lse_top, lse_rest = _exact_background(
            logits, indices, members, num_background=num_background, background=background
        )
    else:
        if searched:
            k = (
                num_background
                if num_rows is not None
                else tf.minimum(num_background, tf.shape(bank)[0])
            )
            top_logits, top_rows = tf.math.top_k(logits, k=k, sorted=False)  # [B, M], any order
        else:
            top_logits = logits
            top_rows = tf.broadcast_to(
                tf.range(tf.shape(bank)[0], dtype=tf.int32)[None], tf.shape(logits)
            )
        is_self = top_rows == indices[:, None]  # [B, M]
        lse_top = _masked_logsumexp(top_logits, ~is_self)
        if background == "exact":
            # Membership of each TopM row in N(i) by binary search in the sorted set.
            sorted_members = tf.sort(members, axis=1)  # [B, S], -1 padding first
            pos = tf.searchsorted(sorted_members, top_rows)  # [B, M]
            found = tf.gather(sorted_members, tf.minimum(pos, num_members - 1), batch_dims=1)
            lse_rest = _masked_logsumexp(top_logits, ~is_self & (found != top_rows))

    # L_ins = logsumexp over TopM(i) U {i} (a set: i counted once) - s_ii.
    instance = tf.reduce_logsumexp(tf.stack([lse_top, self_logit], axis=1), axis=1) - self_logit
    if background == "approx":
        lse_background = lse_top
    else:
        lse_background = tf.reduce_logsumexp(tf.stack([lse_rest, lse_positive], axis=1), axis=1)

    has_positive = tf.reduce_any(hard_valid, axis=1)
    invariance = tf.where(has_positive, lse_background - lse_positive, 0.0)
    return instance, invariance
