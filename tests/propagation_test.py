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


def test_max_set_size():
    assert propagation.max_set_size(4, 3) == 84


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        propagation.propagate(np.zeros((3, 1), np.int32), [0], 0)
