import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import memory_bank

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", "authors_reference_case.npz")


def test_initial_rows_are_seeded_unit_vectors():
    a = memory_bank.MemoryBank(50, 8, seed=3).bank.numpy()
    b = memory_bank.MemoryBank(50, 8, seed=3).bank.numpy()
    c = memory_bank.MemoryBank(50, 8, seed=4).bank.numpy()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_update_rule_against_numpy():
    bank = memory_bank.MemoryBank(20, 4, momentum=0.3, seed=0)
    before = bank.bank.numpy()
    v = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    idx = np.array([5, 0, 19])
    bank.update(idx, v)
    after = bank.bank.numpy()
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    want = 0.3 * before[idx] + 0.7 * unit
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(after[idx], want, rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(20), idx)
    np.testing.assert_array_equal(after[untouched], before[untouched])


def test_matches_authors_update():
    g = np.load(GOLDEN)
    bank = memory_bank.MemoryBank(int(g["N"]), int(g["D"]), momentum=float(g["m"]))
    bank.bank.assign(g["bank"].astype(np.float32))
    bank.update(g["indices"], g["features"].astype(np.float32))
    np.testing.assert_allclose(bank.bank.numpy(), g["bank_after"], atol=1e-6)


def test_update_inside_tf_function_and_checkpoint_round_trip(tmp_path):
    bank = memory_bank.MemoryBank(10, 4, seed=0)
    tf.function(bank.update)(tf.constant([1, 2]), tf.ones([2, 4]))
    path = tf.train.Checkpoint(bank=bank).save(str(tmp_path / "ckpt"))
    other = memory_bank.MemoryBank(10, 4, seed=9)
    tf.train.Checkpoint(bank=other).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(other.bank.numpy(), bank.bank.numpy())


def test_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        memory_bank.MemoryBank(4, 2, momentum=1.0)


_MIRRORED_SCRIPT = """
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from invp_tf import memory_bank  # noqa: E402

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    bank = memory_bank.MemoryBank(16, 4, momentum=0.5, seed=0)
before = bank.bank.numpy()
indices = tf.constant([1, 5, 9, 12], tf.int32)
embeddings = tf.constant(np.random.default_rng(0).standard_normal((4, 4)), tf.float32)
dataset = tf.data.Dataset.from_tensor_slices((indices, embeddings)).batch(4)
for idx, emb in strategy.experimental_distribute_dataset(dataset):
    strategy.run(tf.function(bank.update), args=(idx, emb))
copies = [v.numpy() for v in strategy.experimental_local_results(bank.bank)]
assert len(copies) == 2
np.testing.assert_array_equal(copies[0], copies[1])
unit = embeddings.numpy() / np.linalg.norm(embeddings.numpy(), axis=1, keepdims=True)
want = 0.5 * before[indices.numpy()] + 0.5 * unit
want /= np.linalg.norm(want, axis=1, keepdims=True)
np.testing.assert_allclose(copies[0][indices.numpy()], want, atol=1e-6)
print("OK")
"""


def test_update_under_mirrored_strategy_keeps_replicas_identical():
    # Logical devices must be configured before TF starts: own process.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=repo),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
