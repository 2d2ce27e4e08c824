import numpy as np
import pytest
import tensorflow as tf

from invp_tf import encoder as encoder_lib
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


def test_knn_accuracies_top5_matches_oracle():
    rng = np.random.default_rng(1)
    train, test = rng.standard_normal((120, 6)), rng.standard_normal((40, 6))
    labels, test_labels = rng.integers(0, 7, 120), rng.integers(0, 7, 40)
    got = evaluation.knn_accuracies(
        train, labels, test, test_labels, k=15, temperature=0.2, num_classes=7
    )
    want = _oracle(train, labels, test, 15, 0.2, 7)
    ranks = np.argsort(-want, axis=1, kind="stable")
    assert got["top1"] == np.mean(ranks[:, 0] == test_labels)
    assert got["top5"] == np.mean(np.any(ranks[:, :5] == test_labels[:, None], axis=1))


def test_block_features_are_the_encoders_own_outputs():
    encoder = encoder_lib.build_encoder(
        "resnet18_cifar", head="mlp", embedding_dim=8, width_multiplier=0.0625, image_size=12
    )
    images = tf.random.stateless_uniform([5, 12, 12, 3], seed=[0, 1])
    out = evaluation.block_feature_function(encoder)(images)
    assert list(out) == list(evaluation.BLOCKS)
    direct = encoder(images, training=False)
    # Graph vs eager convolutions may take different oneDNN kernels (seen under load):
    # float32 round-off of about 1e-6, not a different computation.
    np.testing.assert_allclose(out["embedding"], direct["embedding"], atol=1e-6)
    np.testing.assert_allclose(out["stage4"], direct["features"], rtol=1e-5, atol=1e-5)
    maps = encoder.stage_outputs(images, training=False)
    for block in ("stem", "stage1", "stage2", "stage3"):
        np.testing.assert_allclose(
            out[block], np.mean(maps[block], axis=(1, 2)), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="unknown block 'conv5'"):
        evaluation.block_feature_function(encoder, ("stage4", "conv5"))


def test_balanced_subset_is_balanced_deterministic_and_respects_exclusions():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 30 + [-1] * 20)
    np.random.default_rng(0).shuffle(labels)
    subset = evaluation.balanced_subset(labels, 0.1, seed=4)
    np.testing.assert_array_equal(np.bincount(labels[subset]), [10, 5, 3])
    np.testing.assert_array_equal(subset, evaluation.balanced_subset(labels, 0.1, seed=4))
    assert not np.array_equal(subset, evaluation.balanced_subset(labels, 0.1, seed=5))
    held = evaluation.balanced_subset(labels, 0.2, seed=9)
    rest = evaluation.balanced_subset(labels, 1.0, seed=4, exclude=held)
    assert not set(held) & set(rest)
    assert len(held) + len(rest) == 180  # every labelled example is in exactly one
    # A class smaller than 1/fraction still contributes one example.
    np.testing.assert_array_equal(
        np.bincount(labels[evaluation.balanced_subset(labels, 0.001)]), [1, 1, 1]
    )
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            evaluation.balanced_subset(labels, bad)


def test_linear_probe_one_full_batch_step_matches_numpy_oracle():
    rng = np.random.default_rng(2)
    c, lr = 4, 0.5
    x = rng.standard_normal((64, 5)) * [1, 10, 0.1, 3, 1] + 7
    y = rng.integers(0, c, 64)
    test_x, test_y = rng.standard_normal((50, 5)) * [1, 10, 0.1, 3, 1] + 7, rng.integers(0, c, 50)
    result = evaluation.train_linear_probes(
        {"a": x.astype(np.float32)},
        y,
        {"a": test_x.astype(np.float32)},
        test_y,
        num_classes=c,
        epochs=1,
        batch_size=64,
        learning_rate=lr,
        momentum=0.0,
        progress=False,
    )["a"]
    mean, std = x.mean(0), x.std(0) + 1e-6
    target = np.eye(c)[y] - 1.0 / c  # minus the gradient of the CE at zero weights
    kernel = lr * ((x - mean) / std).T @ target / len(y)
    bias = lr * target.mean(0)
    scores = (test_x - mean) / std @ kernel + bias
    assert result["train_loss"] == pytest.approx(np.log(c), rel=1e-6)
    assert result["top1"] == evaluation.top_k_accuracy(scores, test_y, 1)
    assert result["top5"] == 1.0  # C = 4 < 5


def test_linear_probes_learn_each_block_separately():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((3, 6)) * 4
    labels = rng.integers(0, 3, 300)
    feats = centres[labels] + rng.standard_normal((300, 6))
    noise = rng.standard_normal((300, 6))
    train = {"signal": feats[:200] * 1000.0, "noise": noise[:200]}  # scales differ wildly
    test = {"signal": feats[200:] * 1000.0, "noise": noise[200:]}
    results = evaluation.train_linear_probes(
        train, labels[:200], test, labels[200:], num_classes=3, epochs=20, progress=False
    )
    assert results["signal"]["top1"] > 0.97
    assert results["noise"]["top1"] < 0.6


def _blobs(seed, n_train=300, n_test=120, dim=6, classes=3, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 2
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    x_train = centres[y_train] + spread * rng.standard_normal((n_train, dim))
    x_test = centres[y_test] + spread * rng.standard_normal((n_test, dim))
    # Wildly different column scales and one constant column: the fit standardises them.
    scale = np.array([1e-3, 1.0, 1e3, 1.0, 10.0, 1.0])[:dim]
    x_train, x_test = x_train * scale, x_test * scale
    x_train[:, 3] = x_test[:, 3] = 7.0
    return x_train, y_train, x_test, y_test


def test_logistic_regression_chooses_c_on_held_out_train_rows_only():
    from sklearn import linear_model

    x_train, y_train, x_test, y_test = _blobs(0)
    result = evaluation.logistic_regression(
        x_train, y_train, x_test, y_test, c_values=(1e-4, 1.0), seed=3
    )
    fit, held = evaluation.selection_split(y_train, 0.1, seed=3)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y_train)
    # Oracle: the same choice and refit done by hand with scikit-learn.
    std = x_train[fit].std(0)
    std[std < 1e-8] = 1
    held_top1 = {}
    for c in (1e-4, 1.0):
        model = linear_model.LogisticRegression(C=c, max_iter=1000)
        model.fit((x_train[fit] - x_train[fit].mean(0)) / std, y_train[fit])
        held_top1[str(c)] = np.mean(
            model.predict((x_train[held] - x_train[fit].mean(0)) / std) == y_train[held]
        )
    assert result["held_out_top1"] == pytest.approx(held_top1)
    assert result["C"] == 1.0  # C=1e-4 shrinks every weight to about 0 on these blobs
    std = x_train.std(0)
    std[std < 1e-8] = 1
    model = linear_model.LogisticRegression(C=1.0, max_iter=1000)
    model.fit((x_train - x_train.mean(0)) / std, y_train)
    want = np.mean(model.predict((x_test - x_train.mean(0)) / std) == y_test)
    assert result["top1"] == pytest.approx(want)
    assert result["converged"] and result["top1"] > 0.8


def test_knn_tuned_picks_the_best_held_out_k():
    x_train, y_train, x_test, y_test = _blobs(1, spread=2.5)
    result = evaluation.knn_tuned(
        x_train, y_train, x_test, y_test, temperature=0.1, num_classes=3, k_values=(1, 25)
    )
    fit, held = evaluation.selection_split(y_train, 0.1, seed=0)
    held_top1 = {
        str(k): evaluation.knn_accuracies(
            x_train[fit],
            y_train[fit],
            x_train[held],
            y_train[held],
            k=k,
            temperature=0.1,
            num_classes=3,
        )["top1"]
        for k in (1, 25)
    }
    assert result["held_out_top1"] == held_top1
    best = max((1, 25), key=lambda k: held_top1[str(k)])
    assert result["k"] == best
    want = evaluation.knn_accuracies(
        x_train, y_train, x_test, y_test, k=best, temperature=0.1, num_classes=3
    )
    assert result["top1"] == want["top1"]


def test_balanced_subset_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2, -1])
    sample = evaluation.balanced_subset(labels, per_class=2, seed=0)
    assert list(sample) == sorted(sample)
    counts = np.bincount(labels[sample], minlength=3)
    assert list(counts) == [2, 2, 1]  # class 2 has one image; the unlabelled one is never drawn
    np.testing.assert_array_equal(sample, evaluation.balanced_subset(labels, per_class=2))
    with pytest.raises(ValueError, match="one of fraction and per_class"):
        evaluation.balanced_subset(labels, 0.5, per_class=2)
