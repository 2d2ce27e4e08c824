"""RunDir: the run folder round trip (open, restore, append, save, close), its lock and the
rows a resume drops, on tiny variables instead of a model."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import config as config_lib
from invp_tf import identity
from invp_tf import rundir
from invp_tf import workdir as workdir_lib


def _parts(value):
    """Every named part of a training checkpoint, as tiny variables filled with `value`."""
    encoder = tf.Module()
    encoder.kernel = tf.Variable(tf.fill([2, 3], value))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build([encoder.kernel])
    return dict(
        encoder=encoder,
        optimizer=optimizer,
        bank=tf.Variable(tf.fill([4, 2], value)),
        graph=tf.Variable(tf.zeros([4, 1], tf.int32)),
        epoch=tf.Variable(0, dtype=tf.int64),
        step=tf.Variable(0, dtype=tf.int64),
    )


def test_open_restore_append_save_close_round_trip(tmp_path):
    workdir = str(tmp_path / "run")
    config = config_lib.Config(workdir=workdir, epochs=3, knn_k=10)
    strategy = tf.distribute.get_strategy()
    rundir.RunDir.check(workdir)
    with rundir.RunDir.open(config, workdir) as run_dir:
        assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
        with pytest.raises(workdir_lib.WorkdirError, match="in use by another training"):
            rundir.RunDir.open(config, workdir)
        parts = _parts(1.0)
        assert run_dir.restore(strategy, **parts) is None  # a new run
        assert workdir_lib.read_flags(workdir) == config
        for epoch in range(2):
            run_dir.append({"epoch": epoch, "loss": 1.0 - epoch, "knn_top1": None})
        parts["epoch"].assign(1)
        parts["step"].assign(7)
        saved = run_dir.save(1)
    assert saved == os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, "ckpt-1")
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released

    # A rerun with a flag it may change: the state comes back, the record says what changed,
    # and the row of the epoch the checkpoint does not hold (epoch 1) is dropped.
    rerun = config_lib.Config(workdir=workdir, epochs=3, knn_k=5)
    with rundir.RunDir.open(rerun, workdir) as run_dir:
        parts = _parts(0.0)
        assert run_dir.restore(strategy, **parts) == saved
        np.testing.assert_array_equal(parts["bank"].numpy(), np.ones([4, 2]))
        np.testing.assert_array_equal(parts["encoder"].kernel.numpy(), np.ones([2, 3]))
        assert (int(parts["epoch"].numpy()), int(parts["step"].numpy())) == (1, 7)
        assert [row["epoch"] for row in workdir_lib.read_metrics(workdir)] == [0]
    assert workdir_lib.read_flags(workdir).knn_k == 5
    with open(os.path.join(workdir, workdir_lib.HISTORY_FILE)) as f:
        assert (
            f.read()
            .splitlines()[-1]
            .endswith("resumed after epoch 1 with --knn_k=5 (was --knn_k=10)")
        )
    with open(os.path.join(workdir, workdir_lib.METRICS_FILE)) as f:
        assert json.loads(f.readline()) == {"epoch": 0, "loss": 1.0, "knn_top1": None}


def test_a_changed_model_flag_stops_the_open_and_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    config = config_lib.Config(workdir=workdir, head="mlp")
    with rundir.RunDir.open(config, workdir) as run_dir:
        run_dir.restore(tf.distribute.get_strategy(), **_parts(1.0))
        run_dir.save(1)
    before = sorted(os.listdir(workdir))
    with pytest.raises(workdir_lib.WorkdirError, match="--head=linear differs from the run"):
        rundir.RunDir.open(config_lib.Config(workdir=workdir, head="linear"), workdir)
    assert sorted(os.listdir(workdir)) == before  # the lock released, nothing added
    assert workdir_lib.read_flags(workdir).head == "mlp"


def test_saves_carry_the_record_refuse_inf_and_last_good_reads_back(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = config_lib.Config(workdir=workdir, seed=7, hard_negatives=False)
    with rundir.RunDir.open(config, workdir) as run_dir:
        parts = _parts(1.0)
        run_dir.restore(tf.distribute.get_strategy(), **parts)
        first = run_dir.save(1)
        record = identity.read(workdir)
        assert (record.config, record.dataset, record.checkpoint) == (config, None, first)
        parts["bank"].assign(tf.fill([4, 2], np.inf))
        assert run_dir.nonfinite() == ["Variable"]
        with pytest.raises(workdir_lib.NonFiniteError, match="^inf or NaN in Variable$"):
            run_dir.save(2)
        assert workdir_lib.checkpoint_paths(workdir) == [first]  # nothing written
        with monkeypatch.context() as patch:  # what older versions saved
            patch.setattr(workdir_lib, "nonfinite_variables", lambda variables: [])
            second = run_dir.save(2)
        assert workdir_lib.nonfinite_tensors(second) == ["bank"]
        assert run_dir.last_good() == first
