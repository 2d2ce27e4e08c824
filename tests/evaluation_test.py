import numpy as np

from invp_tf import evaluation


def _oracle(train, labels, test, k, t, c):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sims = train @ row
        top = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(c)
        for j in top:
            votes[labels[j]] += np.exp(sims[j] / t)
        out.append(votes)
    return np.array(out)


def test_knn_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((200, 8)), rng.standard_normal((37, 8))
    labels = rng.integers(0, 5, 200)
    scores = evaluation.knn_class_scores(
        train, labels, test, k=20, temperature=0.1, num_classes=5, chunk_size=16
    )
    want = _oracle(train, labels, test, 20, 0.1, 5)
    np.testing.assert_allclose(scores, want, rtol=1e-4)
    predictions = evaluation.knn_classify(train, labels, test, k=20, temperature=0.1, num_classes=5)
    np.testing.assert_array_equal(predictions, want.argmax(1))


def test_hand_worked_vote():
    # Two close class-1 rows outvote one closer class-0 row with k=3.
    train = np.array([[1.0, 0.0], [0.9, 0.5], [0.9, -0.5], [-1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    pred = evaluation.knn_classify(
        train, labels, np.array([[1.0, 0.0]]), k=3, temperature=1.0, num_classes=2
    )
    assert pred.tolist() == [1]
    pred = evaluation.knn_classify(
        train, labels, np.array([[1.0, 0.0]]), k=1, temperature=1.0, num_classes=2
    )
    assert pred.tolist() == [0]


def test_top_k_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert evaluation.top_k_accuracy(scores, [2, 0], k=1) == 0.5
    assert evaluation.top_k_accuracy(scores, [2, 0], k=2) == 1.0
