import sys

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import neighbors


def _clustered(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _oracle(x, k):
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _recall(graph, want):
    k = want.shape[1]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(graph, want, strict=True)])


def _check_contract(x, graph, k, min_recall):
    n = x.shape[0]
    assert graph.shape == (n, k) and graph.dtype == np.int32
    assert not np.any(graph == np.arange(n)[:, None]), "self in its own row"
    sims = np.take_along_axis(x @ x.T, graph.astype(np.int64), axis=1)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "not most similar first"
    assert _recall(graph, _oracle(x, k)) >= min_recall


@pytest.mark.parametrize("method", neighbors.METHODS)
def test_graph_contract(method):
    x = _clustered()
    _check_contract(x, neighbors.build_knn_graph(x, 4, method=method), 4, 0.99)


# Every ScaNN regime of scann_settings, on a bank small enough for a unit test: the
# size thresholds are lowered so that 3,000 rows take the partitioned paths.
@pytest.mark.parametrize(
    "brute_force_max,hashing_min,scoring",
    [(10_000, 10_000, "brute_force"), (1_000, 10_000, "exact_leaves"), (1_000, 2_000, "hashing")],
)
def test_scann_regimes_match_brute_force(monkeypatch, brute_force_max, hashing_min, scoring):
    monkeypatch.setattr(neighbors, "SCANN_BRUTE_FORCE_MAX_ROWS", brute_force_max)
    monkeypatch.setattr(neighbors, "SCANN_HASHING_MIN_ROWS", hashing_min)
    monkeypatch.setattr(neighbors, "QUERY_CHUNK_ROWS", 1_000)  # several query chunks
    x = _clustered(n=3000, d=32, seed=2)
    assert neighbors.scann_settings(3000, 32, 4)["scoring"] == scoring
    _check_contract(x, neighbors.build_knn_graph(x, 4, method="scann"), 4, 0.95)


def test_scann_settings_follow_bank_size():
    assert neighbors.scann_settings(5_000, 128, 4) == {"scoring": "brute_force"}
    medium = neighbors.scann_settings(60_000, 128, 4)
    assert medium["scoring"] == "exact_leaves" and medium["num_leaves"] == 245
    large = neighbors.scann_settings(1_281_167, 128, 4)
    assert large["scoring"] == "hashing" and large["num_leaves"] == 1132
    assert large["reorder"] >= 4 * 4 and large["training_sample_size"] <= 1_281_167


def test_brute_force_chunks_agree():
    x = _clustered(n=300)
    whole = neighbors._brute_force(x, 3)
    np.testing.assert_array_equal(neighbors._brute_force(x, 3, chunk_elements=1000), whole)


def test_scann_matches_brute_force():
    x = _clustered(seed=1)
    a = neighbors.build_knn_graph(x, 5, method="brute_force")
    b = neighbors.build_knn_graph(x, 5, method="scann")
    recall = np.mean([len(set(r) & set(s)) / 5 for r, s in zip(a, b, strict=True)])
    assert recall >= 0.99


def test_duplicate_rows_never_list_self():
    x = np.ones((10, 4), np.float32) / 2.0  # all identical: self may not be in top k+1
    graph = neighbors.build_knn_graph(x, 3, method="brute_force")
    assert not np.any(graph == np.arange(10)[:, None])


def test_bad_arguments():
    x = _clustered(n=10)
    with pytest.raises(ValueError, match="num_neighbors"):
        neighbors.build_knn_graph(x, 10)
    with pytest.raises(ValueError, match="method"):
        neighbors.build_knn_graph(x, 2, method="faiss")
    with pytest.raises(ValueError, match="shape"):
        neighbors.build_knn_graph(x[0], 2)


def test_graph_recall_against_hand_made_graphs():
    x = _clustered(n=300)
    exact = _oracle(x, 3)
    assert neighbors.graph_recall(x, exact, sample_size=100) == 1.0
    # Replace one of the three neighbours of every row by a far row: recall 2/3.
    wrong = exact.copy()
    far = np.argmin(x @ x.T, axis=1)
    wrong[:, 2] = far
    assert neighbors.graph_recall(x, wrong, sample_size=300) == pytest.approx(2 / 3)


def _naive_recall(x, graph, sample_size, seed):
    n, k = graph.shape
    rows = np.random.default_rng(seed).choice(n, min(sample_size, n), replace=False)
    exact = _oracle(x, k)[rows]
    return np.mean([len(set(g) & set(e)) / k for g, e in zip(graph[rows], exact, strict=True)])


@pytest.mark.parametrize("kind", ["exact", "noisy", "random", "self", "repeats"])
def test_graph_recall_streaming_matches_naive_oracle(kind):
    # Small chunks so the running top-k merges many times; poor graphs take the
    # per-chunk partition path.
    x = _clustered(n=500)
    rng = np.random.default_rng(5)
    exact = _oracle(x, 4)
    graph = {
        "exact": exact,
        "noisy": np.where(rng.random(exact.shape) < 0.3, rng.integers(0, 500, exact.shape), exact),
        "random": rng.integers(0, 500, exact.shape),
        "self": np.concatenate([np.arange(500)[:, None], exact[:, :3]], axis=1),
        "repeats": np.concatenate([exact[:, :2], exact[:, :2]], axis=1),
    }[kind]
    got = neighbors.graph_recall(x, graph, sample_size=200, seed=1, chunk_rows=37)
    assert got == pytest.approx(_naive_recall(x, graph, 200, 1))


def test_scann_without_the_package_warns_once_and_builds_the_exact_graph(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "scann", None)  # `import scann` raises ImportError
    monkeypatch.setattr(neighbors, "_warned_scann_missing", False)
    x = _clustered(n=300)
    with caplog.at_level("WARNING"):
        graph = neighbors.build_knn_graph(x, 4, method="scann")
        again = neighbors.build_knn_graph(x, 4, method="scann")
    np.testing.assert_array_equal(graph, neighbors.build_knn_graph(x, 4, method="brute_force"))
    np.testing.assert_array_equal(again, graph)
    warnings = [r.getMessage() for r in caplog.records if "scann package" in r.getMessage()]
    assert warnings == [neighbors.SCANN_MISSING]
    with pytest.raises(ImportError, match="needs the scann package"):
        neighbors.build_search_index(x, "unused")


# --- method="matmul" (TF ops) and "auto" --------------------------------------


def _gaussian(n=400, d=16, seed=3):
    """Unit rows in general position: no two similarities tie, so exact methods agree."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bank_type", ["numpy", "tensor", "variable"])
def test_matmul_equals_brute_force_over_several_chunks(monkeypatch, bank_type):
    x = _gaussian()
    want = neighbors.build_knn_graph(x, 5, method="brute_force")
    # 37 query rows per chunk: 11 chunks, the last one shorter.
    monkeypatch.setattr(neighbors, "MATMUL_CHUNK_BYTES", 4 * 400 * 37)
    bank = {"numpy": x, "tensor": tf.constant(x), "variable": tf.Variable(x)}[bank_type]
    got = neighbors.build_knn_graph(bank, 5, method="matmul")
    assert got.dtype == np.int32 and got.shape == (400, 5)
    np.testing.assert_array_equal(got, want)


def test_matmul_with_duplicate_rows_never_lists_self():
    # Rows 0..4 equal, rows 5..9 equal: every row ties with four others at the top.
    x = np.repeat(np.eye(4, dtype=np.float32)[:2], 5, axis=0)
    graph = neighbors.build_knn_graph(x, 4, method="matmul")
    assert not np.any(graph == np.arange(10)[:, None])
    # The four others of the same group, lower indices first (top_k's tie rule).
    group = lambda i: range(5 * (i // 5), 5 * (i // 5) + 5)  # noqa: E731
    want = np.array([[j for j in group(i) if j != i] for i in range(10)])
    np.testing.assert_array_equal(graph, want)


def test_matmul_reads_a_mirrored_bank(monkeypatch, mirrored_strategy):
    x = _gaussian(n=120, seed=4)
    with mirrored_strategy.scope():
        bank = tf.Variable(x)
    # The search gets the variable itself (no NumPy copy on the way).
    seen, search = [], neighbors._matmul
    monkeypatch.setattr(neighbors, "_matmul", lambda rows, k: seen.append(rows) or search(rows, k))
    got = neighbors.build_knn_graph(bank, 4, method="matmul")
    assert len(seen) == 1 and seen[0] is bank
    np.testing.assert_array_equal(got, neighbors.build_knn_graph(x, 4, method="brute_force"))


def test_auto_picks_matmul_on_an_accelerator_and_scann_on_a_cpu(monkeypatch):
    monkeypatch.setattr(neighbors, "_accelerator", lambda: "/device:GPU:0")
    assert neighbors.auto_method() == "matmul"
    monkeypatch.setattr(neighbors, "_accelerator", lambda: None)
    assert neighbors.auto_method() == "scann"
    monkeypatch.setattr(neighbors, "scann_available", lambda: False)
    assert neighbors.auto_method() == "matmul"
    x = _clustered(n=200)
    np.testing.assert_array_equal(
        neighbors.build_knn_graph(x, 3, method="auto"),
        neighbors.build_knn_graph(x, 3, method="matmul"),
    )
