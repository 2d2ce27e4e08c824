import numpy as np
import pytest
import tensorflow as tf

from invp_tf import propagation


def _oracle(graph, i, layers):
    members, frontier = set(), {i}
    for _ in range(layers):
        frontier = set(graph[sorted(frontier)].reshape(-1).tolist())
        members |= frontier
    members.discard(i)
    return members


def test_hand_worked_graph():
    # 0 -> {1, 2}, 1 -> {0, 2}, 2 -> {3, 0}, 3 -> {2, 1}
    graph = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    out = propagation.propagate(graph, [0, 3], num_layers=2).numpy()
    assert out.shape == (2, 6) and out.dtype == np.int32
    assert set(out[0][out[0] >= 0]) == {1, 2, 3}
    assert set(out[1][out[1] >= 0]) == {0, 1, 2}
    # Members first, padding after.
    for row in out:
        valid = row >= 0
        assert not np.any(valid[np.argmin(valid) :]) or valid.all()


@pytest.mark.parametrize("k,layers", [(1, 1), (3, 2), (4, 3)])
def test_random_graphs_match_set_oracle(k, layers):
    rng = np.random.default_rng(k * 10 + layers)
    n = 30
    graph = np.stack(
        [rng.choice([j for j in range(n) if j != i], k, replace=False) for i in range(n)]
    )
    indices = rng.choice(n, 8, replace=False)
    out = propagation.propagate(graph, tf.constant(indices, tf.int64), layers).numpy()
    assert out.shape == (8, propagation.max_set_size(k, layers))
    for row, i in zip(out, indices, strict=True):
        members = row[row >= 0]
        assert len(members) == len(set(members.tolist())), "duplicates"
        assert i not in members
        assert set(members.tolist()) == _oracle(graph, int(i), layers)
        assert np.all(row[len(members) :] == propagation.PAD)


def test_concatenation_mode_keeps_duplicates_and_anchor():
    graph = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    out = propagation.propagate(graph, [0], num_layers=2, deduplicate=False).numpy()
    # hop 1: [1, 2]; hop 2: graph[1] + graph[2] = [0, 2, 3, 0]
    np.testing.assert_array_equal(out, [[1, 2, 0, 2, 3, 0]])


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_propagate_all_is_propagate_on_every_row(chunk_size):
    rng = np.random.default_rng(3)
    n = 50
    graph = np.stack(
        [rng.choice([j for j in range(n) if j != i], 3, replace=False) for i in range(n)]
    ).astype(np.int32)
    table = propagation.propagate_all(graph, 2, chunk_size=chunk_size)
    assert table.shape == (n, propagation.max_set_size(3, 2)) and table.dtype == np.int32
    np.testing.assert_array_equal(table, propagation.propagate(graph, np.arange(n), 2).numpy())
    for i, row in enumerate(table):
        assert set(row[row >= 0].tolist()) == _oracle(graph, i, 2)


def test_max_set_size():
    assert propagation.max_set_size(4, 3) == 84


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        propagation.propagate(np.zeros((3, 1), np.int32), [0], 0)


def test_positive_purity_hand_worked():
    graph = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    angles = np.array([0.0, 0.1, 1.0, 1.2])
    bank = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = np.array([0, 0, 1, 1])
    # One hop: every N(i) has one same-label member of two; the least similar
    # member (H with P = 1) always has the other label.
    out = propagation.positive_purity(
        graph, bank, labels, np.arange(4), num_layers=1, num_positives=1
    )
    assert out == pytest.approx(
        {"purity_neighbors": 0.5, "purity_hard": 0.0, "mean_positives": 2.0}
    )
    # Two hops from 0: N = {1, 2, 3} (labels 0, 1, 1); H (P = 2) = {3, 2}.
    out = propagation.positive_purity(
        graph, bank, labels, np.array([0]), num_layers=2, num_positives=2, chunk_size=1
    )
    assert out == pytest.approx(
        {"purity_neighbors": 1 / 3, "purity_hard": 0.0, "mean_positives": 3.0}
    )
    # P larger than |N(i)|: H = N.
    out = propagation.positive_purity(
        graph, bank, labels, np.array([0]), num_layers=2, num_positives=10
    )
    assert out["purity_hard"] == pytest.approx(1 / 3)
    # Unlabelled anchors are skipped.
    out = propagation.positive_purity(
        graph, bank, np.array([-1, 0, 1, 1]), np.array([0, 3]), num_layers=1, num_positives=1
    )
    assert out["mean_positives"] == pytest.approx(2.0)
    assert out["purity_neighbors"] == pytest.approx(0.5)
