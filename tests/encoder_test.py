"""Tests for invp_tf.encoder: pinned parameter counts, shapes, BN modes and round trips."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import encoder

# A small CIFAR-stem encoder keeps every test that runs the network fast on 2 CPU cores.
_TINY = {"width_multiplier": 0.125, "embedding_dim": 16}


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _images(batch=2, size=16, seed=0):
    # Float images in [0, 1], the encoder's input contract.
    return tf.random.stateless_uniform([batch, size, size, 3], seed=[seed, 0])


def _built_backbone(architecture, size, width_multiplier=1.0):
    backbone = encoder.Backbone(architecture, width_multiplier)
    backbone(tf.zeros([1, size, size, 3]))
    return backbone


def test_resnet50_parameter_count_matches_torchvision():
    """torchvision resnet50 has 25,557,032 params; its fc has 2048*1000 + 1000 = 2,049,000.

    Without fc: 23,508,032 trainable (torch's BN gamma/beta are parameters too). The BN moving
    mean/variance (buffers in torch) are 2 * 26,560 channels = 53,120 non-trainable values.
    """
    backbone = _built_backbone("resnet50", 32)
    assert _count(backbone.trainable_weights) == 23_508_032
    assert _count(backbone.non_trainable_weights) == 53_120
    assert backbone.feature_dim == 2048


def test_resnet18_cifar_parameter_count():
    """torchvision resnet18 (11,689,512) minus fc (512*1000 + 1000) = 11,176,512; the CIFAR stem
    conv is 3x3x3x64 = 1,728 instead of 7x7x3x64 = 9,408, so 11,176,512 - 7,680 = 11,168,832.

    By hand (conv kernels + BN gamma/beta):
      stem   3*3*3*64 + 2*64                                            =     1,856
      stage1 4 * 3*3*64*64 + 4*128                                      =   147,968
      stage2 3*3*64*128 + 3 * 3*3*128*128 + 64*128 + 5*256              =   525,568
      stage3 3*3*128*256 + 3 * 3*3*256*256 + 128*256 + 5*512            = 2,099,712
      stage4 3*3*256*512 + 3 * 3*3*512*512 + 256*512 + 5*1024           = 8,393,728
      total                                                             = 11,168,832
    BN channels 64 + 4*64 + 5*128 + 5*256 + 5*512 = 4,800 -> 9,600 moving statistics.
    """
    assert 1_856 + 147_968 + 525_568 + 2_099_712 + 8_393_728 == 11_168_832
    backbone = _built_backbone("resnet18_cifar", 8)
    assert _count(backbone.trainable_weights) == 11_168_832
    assert _count(backbone.non_trainable_weights) == 9_600
    assert backbone.feature_dim == 512


def test_resnet18_imagenet_stem_parameter_count():
    # torchvision resnet18 without fc: 11,689,512 - 513,000.
    backbone = _built_backbone("resnet18", 32)
    assert _count(backbone.trainable_weights) == 11_176_512


@pytest.mark.parametrize("width_multiplier, feature_dim", [(0.5, 256), (0.125, 64), (0.001, 1)])
def test_width_multiplier_scales_features(width_multiplier, feature_dim):
    enc = encoder.Encoder("resnet18_cifar", width_multiplier=width_multiplier, embedding_dim=8)
    assert enc.feature_dim == feature_dim
    out = enc(_images(size=8))
    assert out["features"].shape == (2, feature_dim)


@pytest.mark.parametrize("head", encoder.HEADS)
def test_cifar_embedding_and_stage_shapes(head):
    enc = encoder.build_encoder(
        "resnet18_cifar", head=head, embedding_dim=128, width_multiplier=0.5
    )
    out = enc(_images(size=32))
    assert out["embedding"].shape == (2, 128)
    assert out["embedding"].dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    assert out["features"].shape == (2, 256)

    stages = enc.stage_outputs(_images(size=32))
    assert isinstance(stages, collections.OrderedDict)
    assert list(stages) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    sizes = {k: (v.shape[1], v.shape[2], v.shape[3]) for k, v in stages.items()}
    assert sizes == {
        "stem": (32, 32, 32),
        "stage1": (32, 32, 32),
        "stage2": (16, 16, 64),
        "stage3": (8, 8, 128),
        "stage4": (4, 4, 256),
    }


def test_resnet50_shapes_at_64():
    enc = encoder.build_encoder("resnet50")
    out = enc(_images(size=64))
    assert out["embedding"].shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    assert out["features"].shape == (2, 2048)
    stages = enc.stage_outputs(_images(size=64))
    sizes = {k: v.shape[1:] for k, v in stages.items()}
    assert sizes == {
        "stem": (16, 16, 64),
        "stage1": (16, 16, 256),
        "stage2": (8, 8, 512),
        "stage3": (4, 4, 1024),
        "stage4": (2, 2, 2048),
    }


def test_stage4_pooled_equals_features():
    enc = encoder.Encoder("resnet18_cifar", **_TINY)
    images = _images(size=8)
    pooled = tf.reduce_mean(enc.stage_outputs(images)["stage4"], axis=[1, 2])
    np.testing.assert_allclose(enc(images)["features"], pooled, rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_move_only_in_training():
    enc = encoder.build_encoder("resnet18_cifar", image_size=8, **_TINY)
    before = [v.numpy().copy() for v in enc.non_trainable_weights]
    enc(_images(size=8), training=False)
    after_eval = [v.numpy() for v in enc.non_trainable_weights]
    for b, a in zip(before, after_eval, strict=True):
        np.testing.assert_array_equal(b, a)
    enc(_images(size=8), training=True)
    after_train = [v.numpy() for v in enc.non_trainable_weights]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after_train, strict=True))


def test_zero_init_residual():
    enc = encoder.build_encoder("resnet18_cifar", zero_init_residual=True, image_size=8, **_TINY)
    np.testing.assert_array_equal(enc.backbone.stage1_block1.bn2.gamma.numpy(), 0.0)
    np.testing.assert_array_equal(enc.backbone.stage1_block1.bn1.gamma.numpy(), 1.0)
    enc50 = encoder.Backbone("resnet50", width_multiplier=0.125, zero_init_residual=True)
    enc50(tf.zeros([1, 32, 32, 3]))
    np.testing.assert_array_equal(enc50.stage2_block1.bn3.gamma.numpy(), 0.0)


def test_from_config_round_trip():
    enc = encoder.build_encoder("resnet18_cifar", head="mlp", image_size=8, **_TINY)
    config = enc.get_config()
    assert config["backbone"] == "resnet18_cifar" and config["head"] == "mlp"
    clone = encoder.Encoder.from_config(config)
    clone(tf.zeros([1, 8, 8, 3]))
    clone.set_weights(enc.get_weights())
    images = _images(size=8)
    for key in ("embedding", "features"):
        np.testing.assert_array_equal(enc(images)[key], clone(images)[key])


def test_checkpoint_round_trip(tmp_path):
    enc = encoder.build_encoder("resnet18_cifar", head="mlp", image_size=8, **_TINY)
    enc(_images(size=8, seed=1), training=True)  # Move BN statistics away from their init.
    path = tf.train.Checkpoint(encoder=enc).save(str(tmp_path / "ckpt"))
    # Every variable must be in the checkpoint (Keras 3 lists of layers are invisible to it),
    # plus the object graph and save_counter.
    assert len(tf.train.list_variables(path)) == len(enc.weights) + 2

    restored = encoder.build_encoder("resnet18_cifar", head="mlp", image_size=8, **_TINY)
    tf.train.Checkpoint(encoder=restored).restore(path).assert_existing_objects_matched()
    images = _images(size=8)
    for key in ("embedding", "features"):
        np.testing.assert_array_equal(enc(images)[key], restored(images)[key])


def test_mixed_float16_embedding_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        enc = encoder.Encoder("resnet18_cifar", **_TINY)
        out = enc(_images(size=8))
        stage4 = enc.stage_outputs(_images(size=8))["stage4"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert stage4.dtype == tf.float16
    assert out["embedding"].dtype == tf.float32
    assert out["features"].dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"name": "resnet99"}, "resnet99"),
        ({"name": "resnet18_cifar", "head": "transformer"}, "transformer"),
    ],
)
def test_invalid_names_raise(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        encoder.build_encoder(**kwargs)


def test_gradients_reach_every_trainable_variable():
    enc = encoder.build_encoder("resnet18_cifar", head="mlp", image_size=8, **_TINY)
    with tf.GradientTape() as tape:
        embedding = enc(_images(size=8), training=True)["embedding"]
        loss = tf.reduce_sum(embedding[:, 0])
    grads = tape.gradient(loss, enc.trainable_variables)
    assert len(grads) == len(enc.trainable_variables) > 0
    assert all(g is not None for g in grads)


_FUSED = encoder.BatchNorm._fused  # the unpatched kernel call, for the spy below


def _batch_norm_case(monkeypatch, fused, policy, calls=None):
    """A BatchNorm with set weights; `calls` (a list) records each use of the fused kernel,
    so a test can tell that it ran and did not fall back to Keras's path."""
    monkeypatch.setattr(encoder, "FUSED_BATCH_NORM", fused)
    if calls is not None:

        def spy(self, inputs, training):
            calls.append(training)
            return _FUSED(self, inputs, training)

        monkeypatch.setattr(encoder.BatchNorm, "_fused", spy)
    layer = encoder.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=policy)
    layer.build([4, 3, 3, 5])
    layer.gamma.assign(np.linspace(0.5, 1.5, 5))
    layer.beta.assign(np.linspace(-1.0, 1.0, 5))
    layer.moving_mean.assign(np.full(5, 0.3))
    layer.moving_variance.assign(np.full(5, 2.0))
    return layer


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_is_keras_batch_norm(monkeypatch, training, policy):
    # Channels with a large mean next to their spread, as BatchNorm inputs often have.
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 3, 5)), tf.float32)
    results, calls = [], {False: [], True: []}
    for fused in (False, True):
        layer = _batch_norm_case(monkeypatch, fused, policy, calls[fused])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.range(5, dtype=tf.float32))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append((y, grads, layer.moving_mean.numpy(), layer.moving_variance.numpy()))
    # The fused kernel ran (in the layer's mode), and only when switched on.
    assert not calls[False] and calls[True] and set(calls[True]) == {training}
    (y_keras, g_keras, mean_keras, var_keras), (y_fused, g_fused, mean_fused, var_fused) = results
    assert y_fused.dtype == y_keras.dtype == tf.as_dtype(keras.DTypePolicy(policy).compute_dtype)
    tol = 1e-5 if policy == "float32" else 1e-2  # bfloat16 outputs: 8-bit mantissa
    np.testing.assert_allclose(tf.cast(y_fused, tf.float32), tf.cast(y_keras, tf.float32), atol=tol)
    for fused_grad, keras_grad in zip(g_fused, g_keras, strict=True):
        np.testing.assert_allclose(fused_grad, keras_grad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean_fused, mean_keras, rtol=1e-6)
    np.testing.assert_allclose(var_fused, var_keras, rtol=1e-6)
    # The NumPy oracle: biased batch statistics, torch's momentum 0.1, of the inputs as
    # the layer sees them (rounded to bfloat16 under the mixed policy).
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    xs = tf.cast(tf.cast(x, compute_dtype), tf.float32).numpy().reshape(-1, 5).astype(np.float64)
    mean, var = (xs.mean(0), xs.var(0)) if training else (np.full(5, 0.3), np.full(5, 2.0))
    want = (xs - mean) / np.sqrt(var + 1e-5) * np.linspace(0.5, 1.5, 5) + np.linspace(-1, 1, 5)
    np.testing.assert_allclose(
        tf.reshape(tf.cast(y_fused, tf.float32), [-1, 5]), want, atol=tol, rtol=tol
    )
    if training:
        np.testing.assert_allclose(mean_fused, 0.9 * 0.3 + 0.1 * mean, rtol=1e-5)
        np.testing.assert_allclose(var_fused, 0.9 * 2.0 + 0.1 * var, rtol=1e-5)


def test_fused_and_same_padding_encoder_equals_the_plain_one(monkeypatch):
    # The two speed switches change the kernels, not the function: same weights, same
    # outputs (training and inference) and the same moving statistics after a step.
    encoders = []
    for fast in (False, True):
        monkeypatch.setattr(encoder, "FUSED_BATCH_NORM", fast)
        monkeypatch.setattr(encoder, "SAME_PADDING", fast)
        encoders.append(encoder.build_encoder("resnet18", image_size=32, **_TINY))
    plain, fast = encoders
    assert plain.backbone.stage1_block1.conv2.pad == 1
    assert fast.backbone.stage1_block1.conv2.pad == 0
    assert fast.backbone.stage2_block1.conv1.pad == 1  # strided: torch's symmetric pad kept
    fast.set_weights(plain.get_weights())
    images = _images(batch=4, size=32)
    for training in (True, False):
        monkeypatch.setattr(encoder, "FUSED_BATCH_NORM", False)
        want = plain(images, training=training)
        monkeypatch.setattr(encoder, "FUSED_BATCH_NORM", True)
        got = fast(images, training=training)
        # Twenty BatchNorms deep, float32 summation order alone moves the last digits.
        for key in ("features", "embedding"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=2e-4)
    for got, want in zip(fast.non_trainable_weights, plain.non_trainable_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_fused_batch_norm_under_xla_is_the_same_function(monkeypatch):
    # TPUs and --jit_compile lower FusedBatchNormV3 to XLA's own batch-norm kernels.
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (4, 3, 3, 5)), tf.float32)
    results, calls = [], []
    for jit in (False, True):
        layer = _batch_norm_case(monkeypatch, True, "float32", calls)

        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * x)
            return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

        outputs = tf.function(step, jit_compile=jit)(x)
        results.append([*outputs, layer.moving_mean, layer.moving_variance])
    assert calls and set(calls) == {True}  # both functions traced the fused path
    for plain, compiled in zip(*results, strict=True):
        np.testing.assert_allclose(compiled, plain, rtol=1e-5, atol=1e-5)


def test_stem_width_and_head_hidden_dim():
    """The authors' ResNet: `width` scales the stages, the stem keeps 64 channels, and the MLP
    head is 2048 wide whatever the pooled features."""
    enc = encoder.build_encoder(
        "resnet50",
        head="mlp",
        width_multiplier=0.125,
        stem_width=64,
        head_hidden_dim=2048,
        image_size=32,
    )
    shapes = {v.path.split("/", 1)[1]: tuple(v.shape) for v in enc.weights}
    assert shapes["backbone/stem_conv/conv/kernel"] == (7, 7, 3, 64)
    assert shapes["backbone/stage1_block1/conv1/conv/kernel"] == (1, 1, 64, 8)
    # 64 stem channels in, 32 out: the first block projects its shortcut.
    assert shapes["backbone/stage1_block1/downsample_conv/conv/kernel"] == (1, 1, 64, 32)
    assert shapes["head/fc1/kernel"] == (256, 2048) and shapes["head/fc/kernel"] == (2048, 128)
    default = encoder.build_encoder("resnet50", head="mlp", width_multiplier=0.125, image_size=32)
    assert _count(default.weights) < _count(enc.weights)
    assert tuple(default.backbone.stem_conv.conv.kernel.shape) == (7, 7, 3, 8)
    config = enc.get_config()
    assert (config["stem_width"], config["head_hidden_dim"]) == (64, 2048)


def test_normalization_is_the_named_mean_and_std():
    images = _images(size=8)
    cifar = encoder.build_encoder("resnet18_cifar", normalization="cifar", image_size=8, **_TINY)
    imagenet = encoder.build_encoder("resnet18_cifar", image_size=8, **_TINY)
    imagenet.set_weights(cifar.get_weights())
    # The same standardised input through both: cifar's on x, imagenet's on x mapped so that
    # (x' - imagenet_mean) / imagenet_std == (x - cifar_mean) / cifar_std.
    (c_mean, c_std), (i_mean, i_std) = (
        encoder.NORMALIZATIONS["cifar"],
        encoder.NORMALIZATIONS["imagenet"],
    )
    mapped = (images - np.array(c_mean)) / np.array(c_std) * np.array(i_std) + np.array(i_mean)
    np.testing.assert_allclose(
        cifar.features(images), imagenet.features(tf.cast(mapped, tf.float32)), atol=1e-4
    )
    assert encoder.Encoder(**_TINY).normalization == "imagenet"  # the default of every run
    with pytest.raises(ValueError, match="normalization 'lab'"):
        encoder.Encoder(normalization="lab", **_TINY)
