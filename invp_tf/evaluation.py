"""Evaluation of learned features: the weighted kNN monitor of InstDisc."""

import numpy as np
import tensorflow as tf


def knn_class_scores(
    train_features,
    train_labels,
    test_features,
    *,
    k=200,
    temperature=0.07,
    num_classes,
    chunk_size=1024,
):
    """Class scores of the weighted kNN classifier (Wu et al., 2018).

    Each test row votes with its k most similar train rows (cosine similarity),
    each vote weighted exp(cos / temperature).

    Args:
      train_features: [N, D] float features (normalised here).
      train_labels: [N] int labels in [0, num_classes).
      test_features: [T, D] float features (normalised here).
      k: neighbours per test row (clipped to N).
      temperature: vote temperature.
      num_classes: C.
      chunk_size: test rows per similarity block, bounding memory to chunk x N.

    Returns:
      [T, C] float32 numpy array of summed vote weights.
    """
    train = tf.math.l2_normalize(tf.convert_to_tensor(train_features, tf.float32), axis=1)
    labels = tf.convert_to_tensor(np.asarray(train_labels), tf.int32)
    test = tf.math.l2_normalize(tf.convert_to_tensor(test_features, tf.float32), axis=1)
    if train.shape[0] != labels.shape[0]:
        raise ValueError(
            f"train_features has {train.shape[0]} rows but train_labels has {labels.shape[0]}"
        )
    k = min(int(k), int(train.shape[0]))
    scores = []
    for start in range(0, int(test.shape[0]), chunk_size):
        sims = tf.matmul(test[start : start + chunk_size], train, transpose_b=True)  # [t, N]
        top_sims, top_rows = tf.math.top_k(sims, k=k)  # [t, k]
        votes = tf.one_hot(tf.gather(labels, top_rows), num_classes)  # [t, k, C]
        weights = tf.exp(top_sims / temperature)[..., None]  # [t, k, 1]
        scores.append(tf.reduce_sum(votes * weights, axis=1).numpy())
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores, axis=0)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k=200,
    temperature=0.07,
    *,
    num_classes,
    chunk_size=1024,
):
    """Predicted labels [T] int32 of the weighted kNN classifier (see knn_class_scores)."""
    scores = knn_class_scores(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return np.argmax(scores, axis=1).astype(np.int32)


def top_k_accuracy(scores, labels, k=1):
    """Fraction of rows whose label is among the k highest scores."""
    labels = np.asarray(labels)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1))) if len(labels) else 0.0


def inference_function(encoder, key="embedding"):
    """A tf.function images [B, H, W, 3] -> encoder output `key`, inference mode."""
    return tf.function(lambda images: encoder(images, training=False)[key], reduce_retracing=True)


def extract_embeddings(infer, dataset):
    """Runs `infer` (see inference_function) over (images, indices, labels) batches.

    Returns:
      (features [n, F] float32, indices [n] int32, labels [n] int32) numpy arrays.
    """
    features, indices, labels = [], [], []
    for images, index, label in dataset:
        features.append(infer(images).numpy())
        indices.append(index.numpy())
        labels.append(label.numpy())
    return np.concatenate(features), np.concatenate(indices), np.concatenate(labels)
