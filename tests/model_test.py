"""InvPModel.train_step wires the same loss code path, the optimizer and the bank update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import encoder as encoder_lib
from invp_tf import losses
from invp_tf import model as model_lib

OPTIONS = dict(temperature=0.2, num_background=16, num_layers=2, num_positives=3)


def _model(options=OPTIONS, n=40):
    keras.utils.set_random_seed(0)
    encoder = encoder_lib.build_encoder(
        "resnet18_cifar", head="mlp", embedding_dim=8, width_multiplier=0.0625, image_size=8
    )
    model = model_lib.InvPModel(
        encoder,
        n,
        embedding_dim=8,
        num_neighbors=2,
        memory_momentum=0.5,
        seed=1,
        loss_config=losses.LossConfig(**options),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _batch(n=40, b=6):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(b, 8, 8, 3)).astype(np.float32)
    indices = rng.choice(n, b, replace=False).astype(np.int32)
    return images, indices, np.zeros(b, np.int32)


@pytest.mark.parametrize("background_search", losses.BACKGROUND_SEARCHES)
def test_train_step_uses_invp_losses_and_updates_bank(background_search):
    options = dict(OPTIONS, background_search=background_search)
    model = _model(options)
    graph = np.stack([(np.arange(40) + 1) % 40, (np.arange(40) + 2) % 40], 1).astype(np.int32)
    model.knn_graph.assign(graph)
    model.invariance_weight.assign(0.6)
    images, indices, labels = _batch()
    bank_before = model.memory_bank.bank.numpy()
    # BatchNorm in training mode uses batch statistics, so this equals the
    # forward pass inside the step.
    embeddings = model.encoder(images, training=True)["embedding"].numpy()
    instance, invariance = losses.invp_losses(embeddings, indices, bank_before, graph, **options)
    weights_before = [w.numpy() for w in model.encoder.trainable_weights]

    logs = model.train_step((tf.constant(images), tf.constant(indices), tf.constant(labels)))

    np.testing.assert_allclose(float(logs["loss_ins"]), np.mean(instance), rtol=1e-5)
    np.testing.assert_allclose(float(logs["loss_inv"]), np.mean(invariance), rtol=1e-5)
    np.testing.assert_allclose(
        float(logs["loss"]), np.mean(instance) + 0.6 * np.mean(invariance), rtol=1e-5
    )
    want = 0.5 * bank_before[indices] + 0.5 * embeddings
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    bank_after = model.memory_bank.bank.numpy()
    np.testing.assert_allclose(bank_after[indices], want, atol=1e-5)
    others = np.setdiff1d(np.arange(40), indices)
    np.testing.assert_array_equal(bank_after[others], bank_before[others])
    changed = [
        not np.array_equal(a, b.numpy())
        for a, b in zip(weights_before, model.encoder.trainable_weights, strict=True)
    ]
    assert all(changed)


def test_invariance_has_no_effect_while_its_weight_is_zero():
    model = _model()
    images, indices, labels = _batch()
    logs = model.train_step((tf.constant(images), tf.constant(indices), tf.constant(labels)))
    assert float(logs["loss_inv"]) == 0.0
    assert float(logs["loss"]) == float(logs["loss_ins"])


def test_fit_reports_metrics():
    model = _model()
    images, indices, labels = _batch(b=12)
    dataset = tf.data.Dataset.from_tensor_slices((images, indices, labels)).batch(6)
    history = model.fit(dataset, epochs=2, verbose=0)
    assert history.history["loss_ins"][-1] > 0
    assert np.isfinite(history.history["loss"]).all()
