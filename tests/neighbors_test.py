import numpy as np
import pytest

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


@pytest.mark.parametrize("method", neighbors.METHODS)
def test_graph_contract(method):
    x = _clustered()
    graph = neighbors.build_knn_graph(x, 4, method=method)
    assert graph.shape == (600, 4) and graph.dtype == np.int32
    assert not np.any(graph == np.arange(600)[:, None]), "self in its own row"
    sims = np.take_along_axis(x @ x.T, graph.astype(np.int64), axis=1)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "not most similar first"
    want = _oracle(x, 4)
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(graph, want, strict=True)])
    assert recall >= 0.99


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
