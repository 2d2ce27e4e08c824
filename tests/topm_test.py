"""The TopM searches (invp_tf/topm.py): `search`'s log-sum-exp and set against NumPy, each
method and path (dense, chunked, native kernel, TensorFlow ops, XLA) against tf.math.top_k's
set, and the losses each gives against the oracle of tests/losses_test.py."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import losses
from invp_tf import topm
from tests.losses_test import _clustered_case
from tests.losses_test import _losses_and_gradient
from tests.losses_test import _random_case
from tests.losses_test import oracle


def _numpy_topm(v, bank, anchors, m, columns, temperature):
    """(lse over TopM(i) - {i}, lse over TopM(i) - {i} - columns[i]) in float64."""
    s = (v.astype(np.float64) @ bank.T.astype(np.float64)) / temperature
    lse, rest = [], []
    for b, i in enumerate(anchors):
        top = [j for j in np.argsort(-s[b], kind="stable")[:m] if j != i]
        lse.append(np.logaddexp.reduce(s[b, top]))
        kept = [j for j in top if j not in set(columns[b].tolist())]
        rest.append(np.logaddexp.reduce(s[b, kept]))
    return np.array(lse), np.array(rest)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("method", topm.METHODS)
@pytest.mark.parametrize("m", [1, 20, 59, None])
def test_search_is_the_top_m_set_and_its_logsumexp(method, m, compact, monkeypatch):
    # M < 2 * 128: the sampled search's sample is the whole bank, so its set is exact too.
    if compact:  # the chunked searches, at any N, in several chunks
        monkeypatch.setattr(topm, "COMPACT_MIN_RATIO", 1)
        monkeypatch.setattr(topm, "CHUNK_ROWS", 7)
    v, anchors, bank, _ = _random_case()
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    columns = np.array(
        [[3, -1, 7], [-1, -1, -1], [anchors[2], 5, 9], [0, 1, 2], [59, 58, -1], [10, 11, 12]],
        np.int32,
    )
    search = functools.partial(
        topm.search,
        tf.constant(v),
        tf.constant(bank, tf.float32),
        tf.constant(anchors, tf.int32),
        temperature=0.2,
        num_background=m,
        method=method,
    )
    top = search()
    want_lse, want_rest = _numpy_topm(v, bank, anchors, m or len(bank), columns, 0.2)
    np.testing.assert_allclose(top.lse.numpy(), want_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(top.lse_without(columns).numpy(), want_rest, rtol=1e-5, atol=1e-5)
    chunked = compact and method != "top_k" and m is not None and m < len(bank)
    assert (top.logits is None) == chunked
    kept = search(keep_logits=True)
    np.testing.assert_allclose(kept.logits.numpy(), v @ bank.T / 0.2, rtol=1e-5, atol=1e-5)


def test_unknown_method_is_named():
    v, anchors, bank, _ = _random_case()
    with pytest.raises(ValueError, match="background_search must be one of"):
        topm.search(v, bank, anchors, temperature=0.2, num_background=20, method="approximate")


# --- background_search="sampled" --------------------------------------------
# With M < 2 * topm._SAMPLED_RANK the column sample is the whole bank, so the threshold
# is the exact M-th value and the sampled search must reproduce the definition.
SAMPLED_OPTIONS = [
    dict(),
    dict(background="exact"),
    dict(hard_positives=False),
    dict(num_layers=1),
    dict(num_background=55),  # M close to N: TopM holds nearly every row, the last one too
    dict(num_background=55, background="exact"),
]


@pytest.fixture(params=["dense", "compact", "compact_ops"])
def sampled_path(request, monkeypatch):
    """Runs a test once per implementation of the sampled search.

    compact: the flat lists (native listing on a CPU); compact_ops: TensorFlow ops list.
    """
    if request.param.startswith("compact"):
        monkeypatch.setattr(topm, "COMPACT_MIN_RATIO", 1)  # the flat-list path at any N
        monkeypatch.setattr(topm, "CHUNK_ROWS", 7)  # and several bank chunks
        if request.param == "compact":
            assert topm._native_ops() is not None, "the native TopM kernels do not run"
        else:
            monkeypatch.setattr(topm, "_native_ops", lambda: None)
    else:
        monkeypatch.setattr(topm, "COMPACT_MIN_RATIO", 10**9)
    return request.param


@pytest.mark.parametrize(
    "options",
    SAMPLED_OPTIONS,
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_sampled_search_with_whole_sample_matches_oracle(sampled_path, options):
    v, indices, bank, graph = _random_case()
    kwargs = dict(temperature=0.2, num_background=20, num_layers=3, num_positives=7)
    kwargs.update(options)
    instance, invariance = losses.invp_losses(
        v.astype(np.float32),
        indices,
        bank.astype(np.float32),
        graph,
        background_search="sampled",
        **kwargs,
    )
    want_instance, want_invariance = oracle(v, indices, bank, graph, **kwargs)
    np.testing.assert_allclose(instance.numpy(), want_instance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invariance.numpy(), want_invariance, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("background", losses.BACKGROUNDS)
def test_sampled_search_is_close_to_exact(sampled_path, background):
    # M = 1024 of N = 6000: every 8th bank row is sampled, the threshold is the
    # sample's 128th value, so TopM holds M +- a few dozen rows before the correction.
    v, indices, bank, graph = _clustered_case()
    kwargs = dict(
        temperature=0.1, num_background=1024, num_layers=3, num_positives=20, background=background
    )
    exact = _losses_and_gradient(v, indices, bank, graph, **kwargs)
    sampled = _losses_and_gradient(v, indices, bank, graph, background_search="sampled", **kwargs)
    for got, want in zip(sampled[:2], exact[:2], strict=True):
        assert abs(np.mean(got) - np.mean(want)) < 2e-3  # the batch means the step minimises
        assert np.max(np.abs(got - want)) < 2e-2
    cosine = np.sum(sampled[2] * exact[2]) / np.linalg.norm(sampled[2]) / np.linalg.norm(exact[2])
    assert cosine > 0.999


def test_sampled_search_under_xla_matches_eager():
    v, indices, bank, graph = _clustered_case(n=3000, b=16)
    kwargs = dict(
        temperature=0.1, num_background=512, num_layers=3, num_positives=20, background="exact"
    )
    search = dict(background_search="sampled", **kwargs)
    fn = tf.function(
        lambda v: losses.invp_losses(v, indices, bank, graph, **search), jit_compile=True
    )
    for got, want in zip(fn(v), losses.invp_losses(v, indices, bank, graph, **search), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_sampled_search_on_a_collapsed_bank(sampled_path):
    # Every bank row equal: all similarities tie at the threshold. TopM is then M
    # copies of the same value, which the count correction reproduces exactly; the
    # gradient only stays finite (the threshold carries none, so the M tied rows get
    # none either: exact gives 0 for L_ins, the sampled search -bank[i] / tau).
    rng = np.random.default_rng(0)
    bank = np.tile(np.eye(8, dtype=np.float32)[:1], (600, 1))
    v = rng.standard_normal((4, 8)).astype(np.float32)
    indices = np.array([0, 5, 7, 9])
    graph = np.stack([(np.arange(600) + 1) % 600, (np.arange(600) + 2) % 600], axis=1)
    kwargs = dict(temperature=0.1, num_background=256, num_layers=2, num_positives=3)
    exact = _losses_and_gradient(v, indices, bank, graph, **kwargs)
    sampled = _losses_and_gradient(v, indices, bank, graph, background_search="sampled", **kwargs)
    for got, want in zip(sampled[:2], exact[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(sampled[2]))


# --- background_search="exact": the top_k set without a top_k over the bank ----


def _logits_case(kind, b=16, n=3000, seed=0):
    """[b, n] float32 similarities / tau of one kind of bank."""
    rng = np.random.default_rng(seed)
    if kind == "quantised":  # a dozen distinct values: hundreds tie at the M-th
        return (np.round(rng.standard_normal((b, n)) * 2) / 2).astype(np.float32)
    if kind == "clustered":
        v, _, bank, _ = _clustered_case(n=n, b=b, seed=seed)
    else:
        bank = rng.standard_normal((n // 4 if kind == "duplicated" else n, 32))
        if kind == "duplicated":  # every row four times: ties in fours at the M-th value
            bank = np.repeat(bank, 4, axis=0)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        v = bank[rng.choice(n, b, replace=False)] + 0.2 * rng.standard_normal((b, 32))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (v.astype(np.float32) @ bank.astype(np.float32).T / 0.1).astype(np.float32)


# How the exact search runs: the native kernel (on a CPU, outside XLA), or its
# TensorFlow ops eagerly, in a tf.function, and under XLA (where the kernel never runs).
SEARCH_MODES = ["native", "eager", "function", "xla"]


def _exact_search(fn, mode, monkeypatch):
    """fn (a search over logits) as `mode` runs it."""
    if mode == "native":
        if topm._native_ops() is None:
            pytest.fail("the native TopM kernels do not run here (see the warning above)")
        return tf.function(fn)
    monkeypatch.setattr(topm, "_native_ops", lambda: None)
    return fn if mode == "eager" else tf.function(fn, jit_compile=mode == "xla")


def _top_k_mask(logits, m, excluded):
    """The oracle: tf.math.top_k's M columns per row, minus the excluded one."""
    _, top = tf.math.top_k(logits, k=m)
    mask = np.zeros(logits.shape, bool)
    np.put_along_axis(mask, top.numpy(), True, axis=1)
    mask[np.arange(len(mask)), excluded] = False
    return mask


@pytest.mark.parametrize("mode", SEARCH_MODES)
@pytest.mark.parametrize("kind", ["random", "duplicated", "quantised", "clustered"])
def test_exact_search_is_the_top_k_set(kind, mode, monkeypatch):
    # M = 510 of N = 3000: every 3rd column sampled, a bracket, then a top_k of C.
    # (510, not 512: the duplicated bank's ties in fours then straddle the M-th.)
    logits = _logits_case(kind)
    m = 510
    excluded = np.random.default_rng(1).integers(0, logits.shape[1], len(logits)).astype(np.int32)
    search = _exact_search(lambda x: topm._exact_top_mask(x, m, excluded), mode, monkeypatch)
    got = search(tf.constant(logits)).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, m, excluded))
    # The case is what it says: ties straddle the M-th value in some rows of the
    # tied banks, and the bracket resolves all but the quantised bank (hundreds
    # of values tie at its M-th, more than C: the top_k fallback).
    descending = -np.sort(-logits, axis=1)
    straddling = np.sum(descending[:, m - 1] == descending[:, m])
    assert (straddling > 0) == (kind in ("duplicated", "quantised"))
    _, _, hit = topm._exact_bracket(tf.constant(logits), m, topm._EXACT_CANDIDATES)
    assert bool(hit) == (kind != "quantised")


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_exact_bracket_interpolates_on_until_every_row_is_within_reach(mode, monkeypatch):
    # A trained bank's shape: the anchor's class (15% of the rows) is a second, higher mode
    # of the similarities and the M-th value (17% down) lies in the sparse gap below it,
    # where a linear interpolation of the count converges slowly. Three interpolations
    # leave rows outside reach of the top_k of C; the extra ones (a while loop) bring every
    # row in, so the batch does not fall back to the top_k over N, and the set is the same.
    rng = np.random.default_rng(0)
    b, n, m = 32, 6000, 1020
    second = rng.random((b, n)) < 0.15
    logits = np.where(second, 5 + rng.normal(size=(b, n)), rng.normal(size=(b, n)))
    logits = tf.constant(logits.astype(np.float32))
    c = topm._EXACT_CANDIDATES

    def missed_rows(extra):
        monkeypatch.setattr(topm, "_EXACT_EXTRA_INTERPOLATIONS", extra)
        bracket = lambda x: topm._exact_bracket(x, m, c)  # noqa: E731
        if mode != "eager":
            bracket = tf.function(bracket, jit_compile=mode == "xla")
        _, need, hit = bracket(logits)
        need = need.numpy()
        assert bool(hit) == (not np.any((need < 1) | (need > c)))
        return int(np.sum((need < 1) | (need > c)))

    assert missed_rows(0) >= 5
    assert missed_rows(3) == 0
    excluded = rng.integers(0, n, b).astype(np.int32)
    for search_mode in ("native", mode):
        search = _exact_search(
            lambda x: topm._exact_top_mask(x, m, excluded), search_mode, monkeypatch
        )
        got = search(logits).numpy()
        np.testing.assert_array_equal(got, _top_k_mask(logits.numpy(), m, excluded))


@pytest.mark.parametrize("mode", ["native", "eager"])
def test_exact_search_counts_the_excluded_column_once(mode, monkeypatch):
    # The excluded column is above hi, among the candidates, or below TopM.
    logits = _logits_case("random", b=3)
    order = np.argsort(-logits, axis=1, kind="stable")
    excluded = np.array([order[0, 0], order[1, 511], order[2, 2000]], np.int32)
    search = _exact_search(lambda x: topm._exact_top_mask(x, 512, excluded), mode, monkeypatch)
    got = search(tf.constant(logits)).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, 512, excluded))
    assert list(got.sum(axis=1)) == [511, 511, 512]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("background", losses.BACKGROUNDS)
@pytest.mark.parametrize("positive_mode", losses.POSITIVE_MODES)
def test_exact_search_gives_the_losses_of_top_k(background, positive_mode, native, monkeypatch):
    # native: the kernel's set in eager mode (and the ops' under XLA below); else the ops'.
    if native:
        assert topm._native_ops() is not None, "the native TopM kernels do not run"
    else:
        monkeypatch.setattr(topm, "_native_ops", lambda: None)
    v, indices, bank, graph = _clustered_case(n=3000, b=16)
    kwargs = dict(
        temperature=0.1,
        num_background=512,
        num_layers=3,
        num_positives=20,
        background=background,
        positive_mode=positive_mode,
    )
    exact = _losses_and_gradient(v, indices, bank, graph, background_search="exact", **kwargs)
    top_k = _losses_and_gradient(v, indices, bank, graph, background_search="top_k", **kwargs)
    for got, want in zip(exact, top_k, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fn = tf.function(
        lambda v: losses.invp_losses(v, indices, bank, graph, **kwargs), jit_compile=True
    )
    for got, want in zip(fn(v), top_k[:2], strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def _spy_listings(monkeypatch):
    """Calls of topm._list_entries (the chunked listing of the bank), recorded."""
    calls, list_entries = [], topm._list_entries

    def spy(*args, **kwargs):
        calls.append(args[2])  # the threshold
        return list_entries(*args, **kwargs)

    monkeypatch.setattr(topm, "_list_entries", spy)
    return calls


def _compact_exact(monkeypatch, native):
    """Forces the chunked exact search (any N >= M, chunks of 1000 bank rows)."""
    if native:
        assert topm._native_ops() is not None, "the native TopM kernels do not run"
    else:
        monkeypatch.setattr(topm, "_native_ops", lambda: None)
    monkeypatch.setattr(topm, "COMPACT_MIN_RATIO", 1)
    monkeypatch.setattr(topm, "CHUNK_ROWS", 1000)

    def dense(*args, **kwargs):
        raise AssertionError("the dense exact search ran")

    monkeypatch.setattr(topm, "_exact_dense", dense)
    return _spy_listings(monkeypatch)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("background", losses.BACKGROUNDS)
def test_compact_exact_search_gives_the_losses_of_top_k(background, native, monkeypatch):
    # From N >= 64 M the exact search lists the bank in chunks and never holds [B, N];
    # forced here at N = 6000, M = 512 (every 4th row sampled), six chunks.
    v, indices, bank, graph = _clustered_case(b=16)
    kwargs = dict(
        temperature=0.1, num_background=512, num_layers=3, num_positives=20, background=background
    )
    want = _losses_and_gradient(v, indices, bank, graph, background_search="top_k", **kwargs)
    listings = _compact_exact(monkeypatch, native)
    got = _losses_and_gradient(v, indices, bank, graph, background_search="exact", **kwargs)
    for got_part, want_part in zip(got, want, strict=True):
        np.testing.assert_allclose(got_part, want_part, rtol=1e-5, atol=1e-6)
    assert len(listings) == 1  # the sample's bound held in every row


@pytest.mark.parametrize("native", [True, False])
def test_compact_exact_search_lists_a_misled_row_again(native, monkeypatch):
    # Every sampled bank row (every 4th) is close to u and the others are not, so for an
    # anchor near u the sample's lower bound leaves 175 < M rows above it: those rows are
    # listed again whole (the others keep their bound), and the set is still top_k's.
    rng = np.random.default_rng(3)
    n, d, b = 6000, 32, 4
    u = rng.standard_normal(d)
    bank = rng.standard_normal((n, d))
    bank[::4] = u + 0.3 * rng.standard_normal((n // 4, d))
    bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32)
    # Two anchors near u (misled) and two near -u (the sample ranks every row high).
    v = (np.array([u, u, -u, -u]) + 0.1 * rng.standard_normal((b, d))).astype(np.float32)
    indices = np.array([1, 3, 5, 7])
    graph = rng.integers(0, n, (n, 4))
    kwargs = dict(temperature=0.1, num_background=512, num_layers=2, num_positives=5)
    want = _losses_and_gradient(v, indices, bank, graph, background_search="top_k", **kwargs)
    listings = _compact_exact(monkeypatch, native)
    got = _losses_and_gradient(v, indices, bank, graph, background_search="exact", **kwargs)
    for got_part, want_part in zip(got, want, strict=True):
        np.testing.assert_allclose(got_part, want_part, rtol=1e-5, atol=1e-6)
    assert len(listings) == 2
    np.testing.assert_array_equal(np.isneginf(listings[1]), [True, True, False, False])


@pytest.mark.parametrize("native", [True, False])
def test_compact_exact_search_keeps_top_k_s_set_across_chunks(native, monkeypatch):
    # Every bank row four times, 1,500 rows apart, so each tie group spans chunks of
    # 1,000 rows and ties straddle the M-th value (M = 510): the kept (row, column) pairs
    # are top_k's, the lower columns of a tie included, minus the anchor.
    rng = np.random.default_rng(4)
    base = rng.standard_normal((1500, 32))
    bank = np.tile(base / np.linalg.norm(base, axis=1, keepdims=True), (4, 1)).astype(np.float32)
    indices = rng.choice(6000, 8, replace=False)
    v = bank[indices] + 0.2 * rng.standard_normal((8, 32)).astype(np.float32)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    graph = rng.integers(0, 6000, (6000, 4))
    kept, attach = [], topm._attach_gradient

    def spy(embeddings, bank, row, column, values, temperature):
        kept.append((row.numpy(), column.numpy()))
        return attach(embeddings, bank, row, column, values, temperature)

    _compact_exact(monkeypatch, native)
    monkeypatch.setattr(topm, "_attach_gradient", spy)
    kwargs = dict(temperature=0.1, num_background=510, num_layers=2, num_positives=5)
    losses.invp_losses(v, indices, bank, graph, background_search="exact", **kwargs)
    got = np.zeros((8, 6000), bool)
    got[kept[0]] = True
    logits = tf.matmul(tf.math.l2_normalize(v, axis=1), bank, transpose_b=True) / 0.1
    want = _top_k_mask(logits.numpy(), 510, indices.astype(np.int32))
    descending = -np.sort(-logits.numpy(), axis=1)
    assert np.sum(descending[:, 509] == descending[:, 510]) > 0  # ties straddle the M-th
    np.testing.assert_array_equal(got, want)
