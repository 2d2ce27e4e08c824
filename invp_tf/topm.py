"""TopM(i): the M bank rows most similar to an anchor, and their log-sum-exp.

One function, `search`, finds TopM(i) minus {i} for a batch of anchors and returns a `TopM`:
the set's log-sum-exp over s_ij = <v_i, bank[j]> / tau, and the same sum with any other
columns left out (the loss leaves out the positives; nothing here knows what they are).
Everything is float32 and in log-sum-exp form; nothing reads flags or writes state.

The methods (`--background_search`):

- "exact" (default): the very set tf.math.top_k returns, ties included, without a top_k
  over the bank: the native kernel `InvpTopMask` on machines without a GPU or TPU
  (invp_tf/top_mask.cc), else a bracketed threshold and a top_k of a few rows
  (`_exact_top_mask`). From N >= COMPACT_MIN_RATIO * M the bank is scored in chunks and
  [B, N] is never held (`_exact_compact`).
- "top_k": tf.math.top_k over the [B, N] similarities, the definition written out.
- "sampled": every row at or above a threshold read off a strided sample of the bank,
  count-corrected to M rows (`_sampled`); in chunks too from N >= 64 M. BENCHMARKS.md has
  the speeds, and how close "sampled" comes to "exact".
"""

import math

import numpy as np
import tensorflow as tf

from invp_tf import kernels

METHODS = ("exact", "sampled", "top_k")
# The sampled search strides the bank rows so that the threshold is about the
# _SAMPLED_RANK-th largest entry of the sample: M / stride = _SAMPLED_RANK.
_SAMPLED_RANK = 128
# From N >= COMPACT_MIN_RATIO * M (outside XLA, no [B, N] logits asked for) the sampled
# and the exact search score the bank in chunks of CHUNK_ROWS rows, keep the entries above
# a threshold as flat lists (about B * M) and gather TopM's bank rows for the gradient.
COMPACT_MIN_RATIO = 64
CHUNK_ROWS = 16_384
# The exact search's bracket: interpolations, extra ones while a row is out of reach, and
# the top_k that resolves the last rows (see _exact_bracket).
_EXACT_INTERPOLATIONS = 3
_EXACT_EXTRA_INTERPOLATIONS = 3
_EXACT_CANDIDATES = 96
# Masked logits get a large finite value, not -inf: an all-masked row must not
# produce inf - inf = NaN in the forward pass or 0 * inf in the gradient.
MASKED = -1e9


def masked_logsumexp(logits, mask):
    """logsumexp over the entries where mask is True (about -1e9 for an empty row)."""
    return tf.reduce_logsumexp(tf.where(mask, logits, MASKED), axis=-1)


class TopM:
    """TopM(i) minus {i} of a batch of anchors, as `search` found it.

    Attributes:
      lse: [B] float32 log sum_{j in TopM(i) - {i}} e^{s_ij} (count-corrected to M rows
        by the sampled search).
      logits: [B, N] float32 s_ij where the search held them, else None (the chunked
        searches never do).
    """

    def __init__(self, lse, logits, without):
        self.lse, self.logits, self._without = lse, logits, without

    def lse_without(self, columns):
        """[B] log sum over TopM(i) - {i} - columns[i]; columns [B, S] int32, -1 padded."""
        return self._without(columns)


def search(
    embeddings, bank, anchors, *, temperature, num_background, method="exact", keep_logits=False
):
    """TopM(i) minus {i}: the M bank rows j with the largest s_ij, but the anchor's own.

    Args:
      embeddings: [B, D] float32 unit rows v_i; gradients flow through them only.
      bank: [N, D] float32 unit rows (no gradient); N static, or None in a
        shape-polymorphic function (which takes the top_k search).
      anchors: [B] int32 the anchors' own bank rows i.
      temperature: tau.
      num_background: M; None (or M >= N) for the whole bank.
      method: one of METHODS (see the module docstring).
      keep_logits: the caller needs the [B, N] s_ij (`TopM.logits`): no chunked search.

    Returns:
      A TopM.
    """
    if method not in METHODS:
        raise ValueError(f"background_search must be one of {METHODS}, got {method!r}")
    num_rows = bank.shape[0]  # static N, or None inside a shape-polymorphic function
    searched = num_background is not None and (num_rows is None or num_background < num_rows)
    sampled = searched and method == "sampled" and num_rows is not None
    bracketed = searched and method == "exact" and num_rows is not None
    compact = (
        (sampled or bracketed)
        and not keep_logits
        and num_rows >= COMPACT_MIN_RATIO * num_background
        and not _in_xla_context()
    )
    if compact and bracketed:
        return _exact_compact(embeddings, bank, anchors, temperature, num_background)
    logits = None if compact else tf.matmul(embeddings, bank, transpose_b=True) / temperature
    if sampled:
        return _sampled(embeddings, bank, logits, anchors, temperature, num_background)
    if bracketed:
        return _exact_dense(logits, anchors, num_background)
    return _top_k(logits, bank, anchors, num_background if searched else None)


def _top_k(logits, bank, anchors, num_background):
    """TopM by tf.math.top_k over all of [B, N] (num_background None: every bank row)."""
    if num_background is not None:
        k = (
            num_background
            if bank.shape[0] is not None
            else tf.minimum(num_background, tf.shape(bank)[0])
        )
        top_logits, top_rows = tf.math.top_k(logits, k=k, sorted=False)  # [B, M], any order
    else:
        top_logits = logits
        top_rows = tf.broadcast_to(
            tf.range(tf.shape(bank)[0], dtype=tf.int32)[None], tf.shape(logits)
        )
    is_self = top_rows == anchors[:, None]  # [B, M]

    def without(columns):
        # Membership of each TopM row in columns[i] by binary search in the sorted set.
        sorted_columns = tf.sort(columns, axis=1)  # [B, S], -1 padding first
        pos = tf.searchsorted(sorted_columns, top_rows)  # [B, M]
        found = tf.gather(sorted_columns, tf.minimum(pos, columns.shape[1] - 1), batch_dims=1)
        return masked_logsumexp(top_logits, ~is_self & (found != top_rows))

    return TopM(masked_logsumexp(top_logits, ~is_self), logits, without)


def _exact_dense(logits, anchors, num_background):
    """TopM as tf.math.top_k's set (`_exact_top_mask`), its sums masked [B, N] reductions."""
    top_mask = _exact_top_mask(logits, num_background, excluded=anchors)  # TopM(i) - {i}

    def without(columns):
        return _sum_exp(logits, _without_columns(top_mask, columns, anchors))

    return TopM(_sum_exp(logits, top_mask), logits, without)


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
    return tf.where(target > 0, corrected, MASKED)


@tf.custom_gradient
def _sum_exp(logits, mask):
    """log sum_{mask} e^s per row ([B, N] -> [B]; MASKED for an empty row), in few passes.

    Half the [B, N] passes of tf.reduce_logsumexp over tf.where(mask, ...). The shift is the
    row max of all logits: exp(s - shift) underflows only when every masked entry sits more
    than 87 below it (|s| <= 1 / tau: tau < 0.023 at least).
    """
    shift = tf.reduce_max(logits, axis=1, keepdims=True)  # [B, 1]
    exps = tf.where(mask, tf.exp(logits - shift), 0.0)  # [B, N]
    total = tf.reduce_sum(exps, axis=1)  # [B]
    nonempty = total > 0
    safe_total = tf.where(nonempty, total, 1.0)

    def grad(upstream):
        return exps * (upstream / safe_total)[:, None], None

    return tf.where(nonempty, tf.math.log(safe_total) + shift[:, 0], MASKED), grad


def _count(mask):
    """[B, N] bool -> [B] float32 count of True (half the time of tf.math.count_nonzero)."""
    return tf.cast(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1), tf.float32)


def _count_above(logits, threshold):
    """[B] int32 count of logits[b, :] > threshold[b] ([B, N] and [B] float32).

    Summed as int8 in groups of up to 127 columns first: the same count as an int32 sum,
    with a quarter of its memory traffic (each count is a pass over all of [B, N]).
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
       (fewer than M above) or the new lo.
    3. While need is outside 1..C in some row, up to _EXACT_EXTRA_INTERPOLATIONS
       more (a tf.while_loop: a batch that hit pays one test of its condition).
       Trained banks need them more often than random ones (BENCHMARKS.md, "exact
       TopM on a trained bank"; benchmarks/exact_bracket.py).

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

    Without a GPU or TPU and outside XLA, the native kernel `InvpTopMask` finds it in one
    pass per row. Elsewhere TensorFlow ops find the same set (tests/topm_test.py runs both):
    the logits above hi of `_exact_bracket` are all in, and a top_k of C over the row with
    those masked out gives the need others in top_k's own order (value, then lower column).
    Where the bracket still missed (more than about C logits tie at the M-th value, or the
    counts converged too slowly) the whole batch takes tf.math.top_k over N (a tf.cond, so
    shapes stay static for XLA). Either way the set is a function of the logits alone.

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

    Read off every stride-th bank row: a top-k of _SAMPLED_RANK over N / stride columns
    instead of M over N. No gradient: the count correction stands in for rows near t_i, not
    for this row (with one, the gradient lands further from the exact search's).
    """
    stride, _, rank, _ = _sample_plan(num_background, bank.shape[0])
    sample = tf.matmul(embeddings, bank[::stride], transpose_b=True) / temperature
    values, columns = tf.math.top_k(tf.stop_gradient(sample), k=rank)
    return values[:, -1], columns[:, -1] * stride


def _list_entries(embeddings, bank, threshold, temperature):
    """The s_ij > t_i as flat lists (row, column, value, position [C]; count [B]), no gradient.

    The bank is scored CHUNK_ROWS rows at a time, so [B, N] is never held. Within
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
    for start in range(0, bank.shape[0], CHUNK_ROWS):
        chunk = tf.matmul(frozen, bank[start : start + CHUNK_ROWS], transpose_b=True)
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
    """values (s_ij of listed entries, no gradient) with their gradient to embeddings: a
    gather of the C entries' bank rows (one [C, D] pass), not a dense [B, N] x [N, D] matmul.
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


def _in_columns(members, row, column, num_rows):
    """[C] bool: column c of entry c is in members[row c] ([B, S] int32, -1 padded).

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


def _exact_compact(embeddings, bank, anchors, temperature, num_background):
    """TopM as tf.math.top_k's set, found in bank chunks without holding [B, N].

    1. lo: four standard deviations of the sample's rank error below the M-th value of
       the sampled search's sample, so that at least M similarities lie above lo.
    2. The s_ij > lo listed in chunks (`_list_entries`), each row's in column order. A
       row with fewer than M (the sample misled) is listed again whole (lo = -inf).
    3. Each row's top M among its listed values (value, then lower column), but column
       i: the native `InvpListedTop`, or a tf.math.top_k over the values laid out densely.
    4. Only the M entries kept per row get a gradient (a [B * M, D] gather).

    Args:
      embeddings: [B, D] unit rows. bank: [N, D], static N. anchors: [B] int32.
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
            value, row, column, position, count, anchors, k=num_background
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
        keep = tf.gather_nd(chosen, place) & (column != tf.gather(anchors, row))  # TopM - {i}
        kept = tf.where(keep)[:, 0]
        row, column, value = (tf.gather(x, kept) for x in (row, column, value))
    value = _attach_gradient(embeddings, bank, row, column, value, temperature)

    def without(columns):
        rest = ~_in_columns(columns, row, column, num_rows)
        return _segment_sum_exp(value, rest, row, batch)

    return TopM(_segment_sum_exp(value, tf.ones_like(row, tf.bool), row, batch), None, without)


def _segment_sum_exp(values, mask, row, batch):
    """log sum_{mask} e^value per row of the flat entries ([C] -> [B]; MASKED if empty)."""
    masked = tf.where(mask, values, MASKED)
    shift = tf.stop_gradient(tf.math.unsorted_segment_max(masked, row, batch))  # [B]
    total = tf.math.unsorted_segment_sum(
        tf.where(mask, tf.exp(masked - tf.gather(shift, row)), 0.0), row, batch
    )
    nonempty = total > 0
    safe_total = tf.where(nonempty, total, 1.0)
    return tf.where(nonempty, tf.math.log(safe_total) + shift, MASKED)


def _sampled(embeddings, bank, logits, anchors, temperature, num_background):
    """TopM as the rows above a sampled threshold, count-corrected to M rows.

    TopM(i) = {j : s_ij > t_i} plus the row at t_i, t_i from `_sampled_threshold`,
    count-corrected to M entries (ties at t_i, e.g. a collapsed bank, count at t_i).
    With `logits` [B, N] the sums are masked [B, N] reductions (XLA fuses them);
    without, they run over the flat entries of `_entries_above`.

    Args:
      embeddings: [B, D] unit rows. bank: [N, D], static N. logits: [B, N] or None.
      anchors: [B] int32.
    """
    batch = tf.shape(embeddings)[0]
    num_rows = bank.shape[0]
    self_logit = tf.einsum("bd,bd->b", embeddings, tf.gather(bank, anchors)) / temperature
    threshold, threshold_row = _sampled_threshold(embeddings, bank, temperature, num_background)
    # TopM(i) is the entries > t_i plus the row at t_i; i takes one of its M places
    # (also when tied with t_i: the choice among equal rows is arbitrary anyway).
    self_in_top = (self_logit >= threshold) | (threshold_row == anchors)
    target = num_background - tf.cast(self_in_top, tf.float32)
    if logits is None:
        row, column, values = _entries_above(embeddings, bank, threshold, temperature)
        top_mask = column != tf.gather(anchors, row)  # [C]

        def sum_exp_and_count(mask):
            count = tf.math.unsorted_segment_sum(tf.cast(mask, tf.float32), row, batch)
            return _segment_sum_exp(values, mask, row, batch), count

        def rest_mask(columns):
            return top_mask & ~_in_columns(columns, row, column, num_rows)
    else:
        # Entries > t_i, then the anchor's own column cleared (B scattered writes,
        # cheaper than a [B, N] comparison with the column index).
        self_positions = tf.stack([tf.range(batch), anchors], axis=1)  # [B, 2]
        top_mask = tf.tensor_scatter_nd_update(
            logits > threshold[:, None], self_positions, tf.zeros([batch], tf.bool)
        )

        def sum_exp_and_count(mask):
            return _sum_exp(logits, mask), _count(mask)

        def rest_mask(columns):
            return _without_columns(top_mask, columns, anchors)

    lse_top, count_top = sum_exp_and_count(top_mask)

    def without(columns):
        lse_rest, count_rest = sum_exp_and_count(rest_mask(columns))
        # Columns in TopM leave it, and the target with them: those above t_i, and the
        # row at t_i if it is one (the authors' concatenated sets may hold i: not twice).
        at_threshold = tf.reduce_any(columns == threshold_row[:, None], axis=1) & (
            threshold_row != anchors
        )
        rest_target = target - (count_top - count_rest) - tf.cast(at_threshold, tf.float32)
        return _count_corrected(lse_rest, count_rest, rest_target, threshold)

    return TopM(_count_corrected(lse_top, count_top, target, threshold), logits, without)


def _without_columns(mask, members, indices):
    """[B, N] `mask` with the columns members[i] cleared in row i.

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
