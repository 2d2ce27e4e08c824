import os

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import memory_bank

GOLDEN = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "golden", "authors_reference_case.npz"
)


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
    if not os.path.exists(GOLDEN):
        pytest.skip("golden case absent")
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
