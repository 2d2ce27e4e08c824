"""Evaluation of learned features: weighted kNN, per-block linear probes, fine-tuning.

The protocols of the paper's Tables 1-3, as library functions; `invp_tf.evaluate` is
their command line. Every function takes numpy arrays or tf.data pipelines and returns
plain numbers, so a protocol can be checked against a NumPy oracle.
"""

import keras
import numpy as np
import tensorflow as tf

from invp_tf import input_pipeline

# Blocks a probe can read: global-average-pooled stage outputs of the backbone
# (stage4 pooled is the encoder's "features") and the L2-normalised embedding.
BLOCKS = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding")


def knn_class_scores(
    train_features,
    train_labels,
    test_features,
    *,
    num_classes,
    k=200,
    temperature=0.07,
    chunk_size=1024,
):
    """Class scores of the weighted kNN classifier (Wu et al., 2018).

    Each test row votes with its k most similar train rows (cosine similarity),
    each vote weighted exp(cos / temperature).

    Args:
      train_features: [N, D] float features (normalised here).
      train_labels: [N] int labels in [0, num_classes).
      test_features: [T, D] float features (normalised here).
      num_classes: C.
      k: neighbours per test row (clipped to N).
      temperature: vote temperature.
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
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return np.argmax(scores, axis=1).astype(np.int32)


def knn_monitor(config, infer, train_features, test_source, train_labels):
    """Weighted kNN top-1 on the test split; None when it has no labels.

    train_features: [N, D] the bank or fresh embeddings of the training images, by index.
    """
    if test_source is None or not test_source.num_classes:
        return None
    pipeline = input_pipeline.eval_pipeline(
        test_source, batch_size=max(config.batch_size, 256), image_size=config.image_size
    )
    test_features, _, test_labels = extract_embeddings(infer, pipeline)
    predictions = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=config.knn_k,
        temperature=config.knn_temperature,
        num_classes=test_source.num_classes,
    )
    return float(np.mean(predictions == test_labels))


class FreshEmbeddings:
    """Embeddings [N, D] of the current encoder over the training images (eval view), by index.

    The kNN monitor (--knn_features=fresh) and the graph (--graph_features=fresh) both
    read them; one pass serves both while the weights have not changed since.
    """

    def __init__(self, infer, train_source, config, steps):
        self._infer, self._source, self._steps = infer, train_source, steps
        self._batch_size = max(config.batch_size, 256)
        self._image_size = config.image_size
        self._cache = (None, None)  # (train steps when computed, embeddings)

    def __call__(self):
        steps = int(self._steps.numpy())
        if self._cache[0] != steps:
            pipeline = input_pipeline.eval_pipeline(
                self._source, batch_size=self._batch_size, image_size=self._image_size
            )
            features, index, _ = extract_embeddings(self._infer, pipeline)
            self._cache = (steps, features[np.argsort(index)])
        return self._cache[1]


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


def top_k_accuracies(scores, labels):
    """{"top1", "top5"} of class scores [T, C] against labels [T] (top5 = top1 when C < 5)."""
    return {
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, min(5, scores.shape[1])),
    }


def block_feature_function(encoder, blocks=BLOCKS):
    """A tf.function images [B,H,W,3] in [0,1] -> {block: [B, C_block] float32}, inference mode.

    One forward pass gives every requested block: stage maps are global-average-pooled;
    "embedding" is the encoder's L2-normalised embedding of the same pass.
    """
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown block {unknown[0]!r}; valid blocks: {', '.join(BLOCKS)}")
    blocks = tuple(blocks)

    @tf.function(reduce_retracing=True)
    def infer(images):
        maps = encoder.stage_outputs(images, training=False)
        pooled = {
            name: tf.reduce_mean(tf.cast(x, tf.float32), axis=(1, 2)) for name, x in maps.items()
        }
        out = {b: pooled[b] for b in blocks if b != "embedding"}
        if "embedding" in blocks:
            embedding = tf.cast(encoder.head(pooled["stage4"], training=False), tf.float32)
            out["embedding"] = tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12)
        return out

    return infer


def pixel_function(max_side=32):
    """images [B,H,W,3] -> {"pixels": [B, s*s*3]} with s = min(H, max_side) (area resize).

    The raw-pixel baseline's features; large images are shrunk so the baseline stays
    affordable (Fashion-MNIST and CIFAR are used as they are).
    """

    @tf.function(reduce_retracing=True)
    def pixels(images):
        side = images.shape[1]
        if side > max_side:
            images = tf.image.resize(images, [max_side, max_side], method="area")
        return {"pixels": tf.reshape(images, [tf.shape(images)[0], -1])}

    return pixels


def extract_block_features(fn, dataset, num_examples, *, progress=True):
    """Runs `fn` over (images, indices, labels) batches and places rows by index.

    Args:
      fn: images -> {name: [B, F]} (block_feature_function, pixel_function).
      dataset: batches of (images, indices int32 in [0, num_examples), labels).
      num_examples: N, rows of the outputs.
      progress: show a progress bar.

    Returns:
      ({name: [N, F] float32}, labels [N] int32); rows never seen stay zero / label -1.
    """
    features, labels = {}, np.full(num_examples, -1, np.int32)
    bar = keras.utils.Progbar(num_examples, unit_name="image") if progress else None
    for images, index, label in dataset:
        out = fn(images)
        index = index.numpy()
        for name, value in out.items():
            if name not in features:
                features[name] = np.zeros((num_examples, value.shape[1]), np.float32)
            features[name][index] = value.numpy()
        labels[index] = label.numpy()
        if bar is not None:
            bar.add(len(index))
    return features, labels


def knn_accuracies(
    train_features, train_labels, test_features, test_labels, *, k, temperature, num_classes
):
    """{"top1", "top5"} of the weighted kNN classifier (see knn_class_scores)."""
    scores = knn_class_scores(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
    )
    return top_k_accuracies(scores, test_labels)


def balanced_subset(labels, fraction=None, seed=0, exclude=None, *, per_class=None):
    """A class-balanced labelled subset: `fraction` of every class (or `per_class` examples
    of each), drawn with a fixed seed.

    Class c contributes round(fraction * n_c) examples (at least 1) of its n_c candidates,
    or min(per_class, n_c); the draw for class c depends only on (seed, c, its
    candidates), so it is reproducible.

    Args:
      labels: [N] int labels (negative = unlabelled, never drawn).
      fraction: in (0, 1]; give this or per_class.
      seed: the seed of the draw.
      exclude: optional indices that must not be drawn (a held-out evaluation split).
      per_class: examples drawn per class (all of a class that has fewer).

    Returns:
      Sorted int64 indices into labels.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give one of fraction and per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    allowed = labels >= 0
    if exclude is not None:
        allowed[np.asarray(exclude, np.int64)] = False
    chosen = []
    for c in np.unique(labels[allowed]):
        candidates = np.flatnonzero(allowed & (labels == c))
        if per_class is None:
            n = min(len(candidates), max(1, int(round(fraction * len(candidates)))))
        else:
            n = min(len(candidates), per_class)
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(np.sort(rng.choice(candidates, size=n, replace=False)))
    if not chosen:
        raise ValueError("no labelled examples to draw a subset from")
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def train_linear_probes(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes,
    epochs=100,
    batch_size=256,
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=0.0,
    seed=0,
    summary_writer=None,
    progress=True,
):
    """Trains one BatchNorm-free linear classifier per feature block, all on the same batches.

    The probes of all blocks share one tf.function step and one epoch loop, so that every
    block sees the same batches.

    The paper's protocol on frozen features: softmax regression with SGD (momentum,
    coupled L2 weight decay), a step schedule (x0.1 at 60% and 80% of the epochs), zero
    initial weights. Each block is standardised with its train mean and standard deviation
    first (a fixed affine map, so the classifier is still linear in the features); it makes
    one learning rate fit blocks of very different scales.

    Args:
      train_features / test_features: {block: [N, F] / [T, F]} arrays, same keys.
      train_labels / test_labels: [N] / [T] ints in [0, num_classes).
      num_classes: C.
      epochs, batch_size, learning_rate, momentum, weight_decay: the SGD protocol.
      seed: seed of the per-epoch shuffles.
      summary_writer: optional tf.summary writer for per-epoch losses.
      progress: show a progress bar.

    Returns:
      {block: {"top1", "top5", "train_loss"}} on the test rows.
    """
    names = list(train_features)
    n = len(train_labels)
    if n == 0:
        raise ValueError("no training rows for the linear probe")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = max(epochs * steps_per_epoch, 1)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(0.6 * total), int(0.8 * total)],
        [learning_rate, learning_rate * 0.1, learning_rate * 0.01],
    )
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=momentum)
    stats = {name: _mean_and_std(train_features[name]) for name in names}
    train = {
        name: tf.constant(((train_features[name] - m) / s).astype(np.float32))
        for name, (m, s) in stats.items()
    }
    labels = tf.constant(np.asarray(train_labels, np.int32))
    kernels = {
        name: tf.Variable(tf.zeros([train[name].shape[1], num_classes]), name=f"{name}_kernel")
        for name in names
    }
    biases = {name: tf.Variable(tf.zeros([num_classes]), name=f"{name}_bias") for name in names}
    variables = [v for name in names for v in (kernels[name], biases[name])]

    @tf.function
    def step(rows):
        y = tf.gather(labels, rows)
        with tf.GradientTape() as tape:
            losses = {}
            for name in names:
                logits = tf.gather(train[name], rows) @ kernels[name] + biases[name]
                losses[name] = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                )
            penalty = 0.5 * weight_decay * tf.add_n([tf.reduce_sum(k**2) for k in kernels.values()])
            total_loss = tf.add_n(list(losses.values())) + penalty
        optimizer.apply_gradients(zip(tape.gradient(total_loss, variables), variables, strict=True))
        return losses

    rng = np.random.default_rng(seed)
    bar = _epoch_bar(epochs, names) if progress else None
    epoch_loss = {name: float("nan") for name in names}
    for epoch in range(epochs):
        order = rng.permutation(n)
        sums = {name: 0.0 for name in names}
        for b in range(steps_per_epoch):
            losses = step(tf.constant(order[b * batch_size : (b + 1) * batch_size], tf.int32))
            for name in names:
                sums[name] += float(losses[name])
        epoch_loss = {name: sums[name] / max(steps_per_epoch, 1) for name in names}
        if summary_writer is not None:
            with summary_writer.as_default(step=epoch + 1):
                for name, value in epoch_loss.items():
                    tf.summary.scalar(f"linear/{name}/train_loss", value)
        if bar is not None:
            bar.update(epoch + 1, [(f"loss_{name}", v) for name, v in epoch_loss.items()])
    results = {}
    for name in names:
        mean, std = stats[name]
        logits = ((test_features[name] - mean) / std) @ kernels[name].numpy() + biases[name].numpy()
        results[name] = top_k_accuracies(logits, np.asarray(test_labels))
        results[name]["train_loss"] = epoch_loss[name]
    return results


def _epoch_bar(epochs, names):
    """A progress bar over epochs showing each block's epoch loss (not a running mean)."""
    stateful = [f"loss_{name}" for name in names]
    return keras.utils.Progbar(epochs, unit_name="epoch", stateful_metrics=stateful)


def _mean_and_std(features):
    """(mean [F], std + 1e-6 [F]) float32 of [N, F] features, summed in float64."""
    x = features.astype(np.float64)
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)


# Grids searched on a held-out part of train (never on the test split) by the tuned
# baselines and the L-BFGS probe.
LOGREG_C_VALUES = (0.01, 0.1, 1.0)
KNN_K_VALUES = (1, 3, 5, 10, 20, 50, 100, 200)


def selection_split(labels, held_out_fraction=0.1, seed=0):
    """(fit rows, held-out rows) of a train set: a class-balanced held-out part for choosing
    hyperparameters, so the test split never chooses anything."""
    held = balanced_subset(labels, held_out_fraction, seed=seed)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _standardize(train, *others):
    """Train-statistics standardisation (constant columns are left centred, not divided)."""
    x = np.asarray(train, np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-8] = 1.0
    return [((np.asarray(a, np.float64) - mean) / std).astype(np.float32) for a in (train, *others)]


def _fit_logistic_regression(x, y, c, max_iter, start=None):
    """scikit-learn's multinomial L-BFGS fit; `start` = (coef, intercept) to warm-start from."""
    from sklearn import linear_model  # imported here: only the probes need scikit-learn

    model = linear_model.LogisticRegression(
        C=c, max_iter=max_iter, tol=1e-4, warm_start=start is not None
    )
    if start is not None:
        model.coef_, model.intercept_ = (np.array(a) for a in start)
    model.fit(x, y)
    return model


def logistic_regression(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    c_values=LOGREG_C_VALUES,
    held_out_fraction=0.1,
    seed=0,
    max_iter=1000,
):
    """Multinomial logistic regression fitted to convergence (full-batch L-BFGS, scikit-learn)
    on standardised features, its inverse L2 strength C chosen on a held-out part of train.

    The strong linear baseline (and probe): each candidate C is fitted on train minus a
    class-balanced `held_out_fraction`, the best on the held-out rows is refitted on all of
    train and scored once on the test rows. The problem is strictly convex, so each fit
    starts from the previous solution (C ascending, then the chosen C's) to save
    iterations; it ends at the same optimum.

    Returns:
      {"top1", "top5", "C", "held_out_top1": {C: top1}, "iterations", "converged"}.
    """
    labels = np.asarray(train_labels)
    held_out, solutions, start = {}, {}, None
    if len(c_values) > 1:
        fit_rows, held = selection_split(labels, held_out_fraction, seed)
        x_fit, x_held = _standardize(train_features[fit_rows], train_features[held])
        for c in sorted(c_values):
            model = _fit_logistic_regression(x_fit, labels[fit_rows], c, max_iter, start)
            held_out[str(c)] = float(np.mean(model.predict(x_held) == labels[held]))
            start = solutions[c] = (model.coef_, model.intercept_)
    best = max(c_values, key=lambda c: held_out.get(str(c), 0.0))
    x_train, x_test = _standardize(train_features, test_features)
    model = _fit_logistic_regression(x_train, labels, best, max_iter, solutions.get(best))
    scores = np.zeros((len(x_test), int(labels.max()) + 1), np.float32)
    scores[:, model.classes_] = model.predict_proba(x_test)
    iterations = int(np.max(model.n_iter_))
    return {
        **top_k_accuracies(scores, test_labels),
        "C": best,
        "held_out_top1": held_out,
        "iterations": iterations,
        "converged": iterations < max_iter,
    }


def knn_tuned(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    temperature,
    num_classes,
    k_values=KNN_K_VALUES,
    held_out_fraction=0.1,
    seed=0,
):
    """Weighted kNN with k chosen on a held-out part of train (see logistic_regression).

    Returns:
      {"top1", "top5", "k", "held_out_top1": {k: top1}}.
    """
    labels = np.asarray(train_labels)
    fit_rows, held = selection_split(labels, held_out_fraction, seed)
    held_out = {
        str(k): knn_accuracies(
            train_features[fit_rows],
            labels[fit_rows],
            train_features[held],
            labels[held],
            k=k,
            temperature=temperature,
            num_classes=num_classes,
        )["top1"]
        for k in k_values
    }
    best = max(k_values, key=lambda k: held_out[str(k)])
    result = knn_accuracies(
        train_features,
        labels,
        test_features,
        test_labels,
        k=best,
        temperature=temperature,
        num_classes=num_classes,
    )
    return {**result, "k": best, "held_out_top1": held_out}
