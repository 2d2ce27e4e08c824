"""InvPModel.train_step wires the same loss code path, the optimizer and the bank update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import encoder as encoder_lib
from invp_tf import losses
from invp_tf import model as model_lib
from invp_tf import topm

OPTIONS = dict(temperature=0.2, num_background=16, num_layers=2, num_positives=3)


def _model(options=OPTIONS, n=40, learning_rate=0.1):
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
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9))
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


# ---------------------------------------------------------------------------
# The paths a GPU takes, checked on the CPU: the XLA step and mixed float16.


def _graph(n=40):
    return np.stack([(np.arange(n) + 1) % n, (np.arange(n) + 2) % n], 1).astype(np.int32)


def _batches(steps=3, n=40, b=6):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        images = rng.uniform(size=(b, 8, 8, 3)).astype(np.float32)
        indices = rng.choice(n, b, replace=False).astype(np.int32)
        yield tf.constant(images), tf.constant(indices), tf.zeros([b], tf.int32)


def _train(model, step, steps=3):
    model.knn_graph.assign(_graph())
    model.invariance_weight.assign(0.6)
    losses_seen = [float(step(batch)["step_loss"]) for batch in _batches(steps)]
    weights = [w.numpy() for w in model.encoder.trainable_weights]
    return np.array(losses_seen), weights, model.memory_bank.bank.numpy()


@pytest.mark.parametrize("background_search", losses.BACKGROUND_SEARCHES)
def test_xla_step_equals_the_plain_step_and_runs_the_tensorflow_topm(
    background_search, monkeypatch
):
    # --jit_compile XLA-compiles the whole train_step (encoder, TopM search, loss, SGD, bank
    # update). Inside it the TopM searches are TensorFlow ops (the GPU's), never the native
    # CPU kernel: the exact search's bracket is traced in the XLA context.
    traced_in_xla = []
    bracket = topm._exact_bracket

    def spy(*args):
        traced_in_xla.append(topm._in_xla_context())
        return bracket(*args)

    monkeypatch.setattr(topm, "_exact_bracket", spy)
    options = dict(OPTIONS, background_search=background_search)
    plain = _model(options)
    want = _train(plain, tf.function(plain.train_step))
    xla = _model(options)
    got = _train(xla, tf.function(xla.train_step, jit_compile=True))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    # XLA's own BatchNorm kernels reorder the sums (1e-5 per layer, tests/encoder_test.py);
    # over three SGD steps of 6 images at 4 channels a few weights move by up to 1e-3.
    for a, b in zip(got[1], want[1], strict=True):
        assert np.linalg.norm(a - b) <= 5e-3 * np.linalg.norm(b) + 1e-6
    np.testing.assert_allclose(got[2], want[2], atol=1e-4)
    if background_search == "exact":
        assert True in traced_in_xla
        # Outside XLA the native kernel runs where it builds, and the bracket is not traced.
        assert False not in traced_in_xla or topm._native_ops() is None


def _float16_model(learning_rate):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _model(learning_rate=learning_rate)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_step_scales_the_loss_dynamically_and_stays_near_float32():
    # A small learning rate, so that float16 round-off does not grow into other weights.
    model = _float16_model(0.01)
    # What a GPU run gets: the encoder computes in float16, compile() wraps SGD in a
    # dynamic LossScaleOptimizer, and the loss path stays float32.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.encoder.compute_dtype == "float16"
    step = tf.function(model.train_step)
    model.optimizer.build(model.encoder.trainable_variables)  # as training does
    scale = model.optimizer.dynamic_scale
    # This tiny model's gradients overflow float16 at the initial 2^15: the scale halves
    # until they do not (the skipped steps apply nothing), so start where it settles.
    scale.assign(256.0)
    reference = _model(learning_rate=0.01)
    want, _, _ = _train(reference, tf.function(reference.train_step))
    got, _, _ = _train(model, step)
    assert np.all(np.isfinite(got)) and float(scale.numpy()) == 256.0  # no step skipped
    # The first step's loss is the float16 forward pass: within 1e-3 of float32. Later ones
    # follow float16 gradients, which on this CPU differ from float32's by 4% (head) to 14%
    # (stem) in norm for this 4-channel encoder (measured), so the losses drift apart a bit.
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3)
    np.testing.assert_allclose(got, want, rtol=0.1)
    # An overflowing scale: the float16 gradients become inf, the step is skipped (weights
    # unchanged, the own step counter still counts it) and the scale halves.
    scale.assign(2.0**60)
    weights = [w.numpy() for w in model.encoder.trainable_weights]
    steps = int(model.steps.numpy())
    logs = step(next(_batches(1)))
    assert np.isfinite(float(logs["step_loss"]))
    assert float(scale.numpy()) == 2.0**59
    for a, b in zip(weights, model.encoder.trainable_weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(model.steps.numpy()) == steps + 1
    # A finite step again updates the weights.
    scale.assign(256.0)
    step(next(_batches(1)))
    assert float(scale.numpy()) == 256.0
    assert any(
        not np.array_equal(a, b.numpy())
        for a, b in zip(weights, model.encoder.trainable_weights, strict=True)
    )
