"""Tests for invp_tf.memory_plan: the arithmetic by hand, the advice, and peak RSS on a CPU."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import config as config_lib
from invp_tf import encoder as encoder_lib
from invp_tf import losses
from invp_tf import memory_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    base = config_lib.Config(
        batch_size=64,
        image_size=8,
        encoder="resnet18_cifar",
        width_multiplier=0.0625,
        head="mlp",
        embedding_dim=16,
        num_neighbors=2,
        num_layers=2,
        num_positives=3,
        num_background=32,
    )
    return dataclasses.replace(base, **overrides)


def test_dense_plan_by_hand():
    # N = 1000 rows of D = 16, B = 64 over 2 replicas: B_local = 32; native exact search.
    plan = memory_plan.make_plan(_config(), 1000, replicas=2, accelerator=False)
    assert plan.batch_per_replica == 32
    assert plan.terms["bank"] == 1000 * 16 * 4
    assert plan.terms["graph"] == 1000 * 2 * 4
    assert plan.terms["similarity"] == plan.terms["similarity gradient"] == 32 * 1000 * 4
    assert plan.terms["TopM workspace"] == 32 * 1000  # the TopM mask, a byte each
    assert plan.terms["runtime"] == 200_000_000
    assert plan.total == sum(plan.terms.values())
    assert plan.search == "exact, native kernel, dense [B, N]"
    # On a GPU (or under XLA) the exact search is TensorFlow ops: a float32 copy more.
    gpu = memory_plan.make_plan(_config(), 1000, replicas=2, accelerator=True)
    assert gpu.terms["TopM workspace"] == 32 * 1000 * 5
    assert gpu.search == "exact, TensorFlow ops, dense [B, N]"


def test_chunked_searches_never_hold_b_by_n():
    # N >= 64 M: the exact and sampled searches score the bank in chunks (not under XLA).
    n = 64 * 32
    plan = memory_plan.make_plan(_config(), n, accelerator=False)
    assert plan.search.endswith("in bank chunks")
    assert plan.terms["similarity"] == 64 * 16_384 * 4 + int(64 * 1.4 * 32 * 16)
    assert plan.terms["similarity gradient"] == 64 * 32 * 16 * 4
    jit = memory_plan.make_plan(_config(jit_compile=True), n, accelerator=False)
    assert jit.terms["similarity"] == 64 * n * 4 and jit.search.endswith("dense [B, N]")
    top_k = memory_plan.make_plan(_config(background_search="top_k"), n, accelerator=False)
    assert top_k.terms["similarity"] == 64 * n * 4


def test_over_budget_is_one_line_naming_the_largest_term_and_what_to_change():
    plan = memory_plan.make_plan(
        _config(batch_size=256, num_background=100_000), 1_000_000, accelerator=True
    )
    name, _ = plan.largest()
    assert name == "TopM workspace"  # its float32 copy and mask: 5 bytes per [B, N] entry
    with pytest.raises(ValueError) as error:
        plan.check(2e9)
    message = str(error.value)
    assert "\n" not in message and "exceeds the device's 2.00 GB" in message
    assert "TopM workspace" in message and "--batch_size" in message
    plan.check(plan.total)  # at the budget: fine
    plan.check(None)  # no budget known: no check
    big_bank = memory_plan.make_plan(_config(embedding_dim=4096, batch_size=1), 1_000_000)
    with pytest.raises(ValueError, match="largest term is the bank .*--embedding_dim"):
        big_bank.check(1e9)


def test_activation_estimate_counts_each_op_output_at_its_dtype():
    # Hand count, S = 6: float32 Mul and Relu outputs [1, 6, 6, 3]: 2 x 108 x 4 bytes; in
    # float16 a Cast, Mul and Relu: 3 x 108 x 2 bytes. The constant 2.0 does not count.
    def fp32(images, training):
        return {"embedding": tf.nn.relu(images * 2.0)}

    def fp16(images, training):
        return {"embedding": tf.nn.relu(tf.cast(images, tf.float16) * tf.constant(2.0, tf.float16))}

    assert memory_plan.activation_bytes_per_image(fp32, 6) == 2 * 108 * 4
    assert memory_plan.activation_bytes_per_image(fp16, 6) == 3 * 108 * 2


def test_activation_estimate_of_an_encoder_and_the_weights():
    keras.utils.set_random_seed(0)
    encoder = encoder_lib.build_encoder(
        "resnet18_cifar", head="mlp", embedding_dim=8, width_multiplier=0.0625, image_size=8
    )
    small = memory_plan.activation_bytes_per_image(encoder, 8)
    large = memory_plan.activation_bytes_per_image(encoder, 16)
    # The stem's input and every feature map at least: (8 x 8 x 3 + 8 x 8 x 4) x 4 bytes.
    assert small > (8 * 8 * 3 + 8 * 8 * 4) * 4
    assert 3.0 < large / small <= 4.2  # four times the pixels; the head's size is fixed
    plan = memory_plan.make_plan(_config(), 1000, encoder=encoder)
    assert plan.terms["activations"] == 64 * small
    trainable = sum(int(np.prod(v.shape)) for v in encoder.trainable_variables)
    assert plan.terms["weights"] >= 12 * trainable


def _status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def measure_peak(num_examples, batch_size, steps=2):
    """Runs InvP train steps (tiny encoder, 8 px) over a bank of `num_examples` rows in this
    process; prints {"plan": bytes, "measured": peak RSS growth}. Run in a fresh process."""
    from invp_tf import model as model_lib  # pylint: disable=g-import-not-at-top

    def rss():
        return _status_bytes("VmRSS")

    config = _config(batch_size=batch_size, num_background=4096, embedding_dim=128)
    keras.utils.set_random_seed(0)
    encoder = encoder_lib.build_encoder(
        config.encoder,
        head=config.head,
        embedding_dim=config.embedding_dim,
        width_multiplier=config.width_multiplier,
        image_size=config.image_size,
    )
    plan = memory_plan.make_plan(config, num_examples, encoder=encoder, accelerator=False)
    # Warm the runtime (and the native kernel) on a small bank, so only the sizes differ.
    for n, timed in ((8192, False), (num_examples, True)):
        if timed:
            base = rss()
        model = model_lib.InvPModel(
            encoder,
            n,
            embedding_dim=config.embedding_dim,
            num_neighbors=config.num_neighbors,
            loss_config=losses.LossConfig(
                temperature=0.1, num_background=4096, num_layers=2, num_positives=3
            ),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        model.invariance_weight.assign(0.6)
        step = tf.function(model.train_step)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            batch = (
                tf.random.uniform([batch_size, 8, 8, 3]),
                tf.constant(rng.choice(n, batch_size, replace=False), tf.int32),
                tf.zeros([batch_size], tf.int32),
            )
            step(batch)
        if not timed:
            del model, step
    # VmHWM: this process image's own peak. ru_maxrss would carry the parent's RSS across the
    # fork and exec that started this process (a large pytest process inflates it).
    peak = _status_bytes("VmHWM")
    plan_bytes = plan.total - plan.terms["weights"]  # the weights were there at `base`
    print(json.dumps({"plan": plan_bytes, "measured": peak - base}))


def _measured(num_examples, batch_size):
    code = (
        "from tests.memory_plan_test import measure_peak; "
        f"measure_peak({num_examples}, {batch_size})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_plan_matches_peak_rss_of_a_small_run():
    result = _measured(200_000, 64)
    assert result["measured"] == pytest.approx(result["plan"], rel=0.25), result


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_examples,batch_size", [(250_000, 128), (200_000, 256), (240_000, 192)]
)
def test_plan_matches_peak_rss(num_examples, batch_size):
    result = _measured(num_examples, batch_size)
    assert result["measured"] == pytest.approx(result["plan"], rel=0.25), result


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_idx_dir, tmp_path, monkeypatch, capsys):
    from invp_tf import train  # pylint: disable=g-import-not-at-top

    monkeypatch.chdir(REPO)  # the recipe's path is relative to the repo root
    argv = [
        "invp-train",
        "--flagfile=configs/fashion_mnist.flags",
        f"--workdir={tmp_path}/run",
        f"--data_dir={tiny_idx_dir}",
        "--train_examples=64",
        "--num_background=32",
        "--batch_size=16",
        "--image_size=12",
        "--dry_run",
    ]
    train.main(argv)
    out = capsys.readouterr().out
    assert "memory plan per replica (1 replica(s), batch 16 each" in out
    for term in ("bank", "similarity gradient", "TopM workspace", "activations", "total"):
        assert term in out
    assert "pass --device_memory_gb" in out
    assert not (tmp_path / "run").exists()
    train.main([*argv, "--device_memory_gb=1"])
    assert "fits the device's 1.00 GB" in capsys.readouterr().out
    # Over the budget: one line naming the largest term, at startup of a real run too.
    with pytest.raises(SystemExit):
        train.main([*argv[:-1], "--device_memory_gb=0.000001"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("invp_tf.train: error: memory plan: ") and "largest term" in err
    assert not (tmp_path / "run").exists()


def test_checking_the_plan_leaves_the_run_s_initial_weights_alone(tiny_idx_dir, tmp_path):
    from invp_tf import model as model_lib  # pylint: disable=g-import-not-at-top
    from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top

    config = tiny_config(tiny_idx_dir, tmp_path)
    keras.utils.set_random_seed(config.seed)  # as training seeds before the plan
    want = [w.numpy() for w in model_lib.encoder_from_config(config).weights]
    keras.utils.set_random_seed(config.seed)
    memory_plan.check_config(config, 64, tf.distribute.get_strategy())
    got = [w.numpy() for w in model_lib.encoder_from_config(config).weights]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
