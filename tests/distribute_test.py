"""tf.distribute: mirrored replicas match one device; helpers and the TPU path."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import data
from invp_tf import distribute
from invp_tf import input_pipeline
from invp_tf import training
from invp_tf import workdir as workdir_lib
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Record(keras.callbacks.Callback):
    """The running epoch loss after every step, the first replica's bank after every
    epoch and the per-replica bank at the end."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self.losses = []
        self.epoch_banks = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append([logs["loss"], logs["loss_ins"], logs["loss_inv"]])

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_banks.append(
            distribute.local_values(self.strategy, self.model.memory_bank.bank)[0]
        )

    def on_train_end(self, logs=None):
        self.compute_dtype = self.model.encoder.layers[1].compute_dtype
        self.banks = distribute.local_values(self.strategy, self.model.memory_bank.bank)
        self.graphs = distribute.local_values(self.strategy, self.model.knn_graph)


def _run(tiny_idx_dir, workdir, tf_strategy, **overrides):
    # A small learning rate: this 4-channel network is chaotic, and at lr 0.05 the
    # 1e-7 differences of summation order grow to 5e-3 in the bank by epoch 2 on
    # any two setups (even one device with and without the all-reduce BN formula).
    config = tiny_config(
        tiny_idx_dir, workdir, epochs=2, batch_size=16, learning_rate=0.002, **overrides
    )
    record = _Record(tf_strategy)
    row = training.train_and_evaluate(config, config.workdir, [record], strategy=tf_strategy)
    return record, row


def test_mirrored_two_replicas_match_one_device(tiny_idx_dir, tmp_path, mirrored_strategy):
    assert mirrored_strategy.num_replicas_in_sync == 2
    one, one_row = _run(tiny_idx_dir, tmp_path / "one", tf.distribute.get_strategy())
    two, two_row = _run(tiny_idx_dir, tmp_path / "two", mirrored_strategy, strategy="mirrored")
    # Two epochs of 4 steps (global batch 16); the second uses L_inv (rampup_epochs=1).
    assert len(one.losses) == len(two.losses) == 8
    assert two_row["loss_inv"] is not None
    # The two replicas hold the same bank and graph.
    np.testing.assert_array_equal(two.banks[0], two.banks[1])
    np.testing.assert_array_equal(two.graphs[0], two.graphs[1])
    # Epoch 1 equals the one-device run's: losses step by step (running means of the
    # epoch, so each step's value matches) and the bank after it.
    np.testing.assert_allclose(two.losses[:4], one.losses[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.epoch_banks[0], one.epoch_banks[0], atol=2e-5)
    # Epoch 2 (L_inv on) within the chaos of this 4-channel network: the 1e-7 float
    # differences of the two layouts (per-replica batch 8 against 16 pick other CPU
    # kernels on some machines) grew to 1.4e-2 in the bank and 1.3e-4 in L_inv on an
    # AMD EPYC host (2e-5 on an Intel Xeon); per-replica BatchNorm, below, is 0.2 off.
    np.testing.assert_allclose(two.losses[4:], one.losses[4:], rtol=1e-3)
    np.testing.assert_allclose(two.banks[0], one.banks[0], atol=0.05)
    np.testing.assert_array_equal(two.graphs[0], one.graphs[0])
    assert two_row["knn_top1"] == pytest.approx(one_row["knn_top1"], abs=1.5 / 24)  # one image

    # Per-replica BatchNorm statistics (batch 8) are another model: far from equal.
    local, _ = _run(
        tiny_idx_dir,
        tmp_path / "local",
        mirrored_strategy,
        strategy="mirrored",
        sync_batchnorm=False,
    )
    # (0.22 after epoch 1 and 0.17 after epoch 2 on the AMD host.)
    assert np.abs(local.epoch_banks[0] - one.epoch_banks[0]).max() > 0.1
    assert np.abs(local.banks[0] - one.banks[0]).max() > 0.1


def test_train_pipeline_shards_keep_the_global_batch(tiny_idx_dir):
    source = data.load_source("fashion_mnist", "train", str(tiny_idx_dir))
    common = dict(image_size=12, view="crop_flip", seed=1, epoch=2)
    whole = list(input_pipeline.train_pipeline(source, batch_size=16, **common))
    parts = [
        list(
            input_pipeline.train_pipeline(
                source, batch_size=4, global_batch_size=16, shard_index=w, num_shards=2, **common
            )
        )
        for w in range(2)
    ]
    assert len(whole) == 4 and all(len(p) == 8 for p in parts)
    for step, (images, indices, _) in enumerate(whole):
        # Step s of worker w: its two per-replica batches, replicas in order.
        pieces = [parts[w][2 * step + r] for w in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), indices)
        np.testing.assert_allclose(np.concatenate([p[0] for p in pieces]), images)
    skipped = list(input_pipeline.train_pipeline(source, batch_size=16, skip_steps=3, **common))
    assert len(skipped) == 1
    np.testing.assert_array_equal(skipped[0][1], whole[3][1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=16, num_shards=3), "does not split into 3 worker"),
        (dict(global_batch_size=16, num_shards=2, shard_index=2), "shard_index 2"),
        (dict(skip_steps=17), r"skip_steps 17 is not in \[0, 16\]"),
    ],
)
def test_train_pipeline_bad_sharding_is_named(tiny_idx_dir, kwargs, message):
    source = data.load_source("fashion_mnist", "train", str(tiny_idx_dir))
    with pytest.raises(ValueError, match=message):
        input_pipeline.train_pipeline(
            source, batch_size=4, image_size=12, view="crop_flip", seed=0, epoch=0, **kwargs
        )


def test_batch_not_divisible_by_replicas(tiny_idx_dir, tmp_path, mirrored_strategy):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", batch_size=15, strategy="mirrored")
    with pytest.raises(ValueError, match="--batch_size=15 does not split over the 2 replicas"):
        training.train_and_evaluate(config, config.workdir, strategy=mirrored_strategy)
    config = tiny_config(tiny_idx_dir, tmp_path / "run", strategy="mirrored", jit_compile=True)
    with pytest.raises(ValueError, match="--jit_compile does not work with --strategy=mirrored"):
        training.train_and_evaluate(config, config.workdir, strategy=mirrored_strategy)


def test_strategy_errors_are_named(monkeypatch):
    with pytest.raises(ValueError, match="--strategy=horovod is not one of default, mirrored"):
        distribute.make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="--strategy=multi_worker needs TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}),
    )
    with pytest.raises(ValueError, match=r"task index 3 is not in \[0, 1\)"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="--cpu_devices=0 must be >= 1"):
        distribute.configure_cpu_devices(0)
    # TF is running with 2 logical CPUs (conftest): another count is refused, by name.
    with pytest.raises(ValueError, match="--cpu_devices=4: TensorFlow already started with 2"):
        distribute.configure_cpu_devices(4)


def test_tpu_without_a_tpu_is_named():
    with pytest.raises(ValueError, match="--strategy=tpu: no TPU found at this machine"):
        distribute.make_strategy("tpu")
    with pytest.raises(ValueError, match="cannot reach --tpu=grpc://127.0.0.1:1"):
        distribute.make_strategy("tpu", tpu="grpc://127.0.0.1:1")


def test_precision_policy():
    default = tf.distribute.get_strategy()
    assert distribute.precision_policy(default, False) == "float32"
    # No GPU here: CPUs compute in bfloat16 (oneDNN's AMX / AVX512_BF16 kernels).
    assert not tf.config.list_logical_devices("GPU")
    assert distribute.precision_policy(default, True) == "mixed_bfloat16"
    before = keras.config.dtype_policy().name
    with distribute.dtype_policy("mixed_float16"):
        assert keras.config.dtype_policy().name == "mixed_float16"
    assert keras.config.dtype_policy().name == before


def test_broadcast_and_chief_off_multi_worker(mirrored_strategy):
    graph = np.arange(12, dtype=np.int32).reshape(4, 3)
    assert distribute.is_chief(mirrored_strategy)
    np.testing.assert_array_equal(distribute.broadcast_from_chief(mirrored_strategy, graph), graph)
    assert distribute.checkpoint_directory(mirrored_strategy, "/w/checkpoints") == "/w/checkpoints"


# ---------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two worker processes on loopback.


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class _Cluster:
    """`python -m invp_tf.train --strategy=multi_worker` on two local worker processes."""

    def __init__(self, config, tmp_path):
        self.flagfile = tmp_path / f"{os.path.basename(config.workdir)}.flags"
        self.flagfile.write_text("\n".join(config.flagfile_lines()) + "\n")
        self.logs = tmp_path / f"{os.path.basename(config.workdir)}.logs"
        self.logs.mkdir(exist_ok=True)
        self.launches = 0

    def start(self):
        ports = _free_ports(2)
        self.launches += 1
        self.processes = []
        for index in range(2):
            tf_config = {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            }
            env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), CUDA_VISIBLE_DEVICES="")
            log = open(self.logs / f"worker{index}.{self.launches}.log", "w")  # noqa: SIM115
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "invp_tf.train", f"--flagfile={self.flagfile}"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        return self

    def wait(self, timeout=300):
        try:
            codes = [p.wait(timeout=timeout) for p in self.processes]
        finally:
            for p in self.processes:
                p.kill()
        return codes

    def log(self, index):
        return (self.logs / f"worker{index}.{self.launches}.log").read_text()


def _bank(workdir, name=None):
    path = str(workdir / "checkpoints" / name) if name else str(workdir / "checkpoints")
    if not name:
        path = tf.train.latest_checkpoint(path)
    reader = tf.train.load_checkpoint(path)
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("bank/"))
    return reader.get_tensor(key)


def _mw_config(tiny_idx_dir, workdir, **overrides):
    return tiny_config(
        tiny_idx_dir,
        workdir,
        batch_size=16,
        learning_rate=0.002,
        strategy="multi_worker",
        **overrides,
    )


def test_two_workers_train_resume_after_sigterm_and_restore_on_one(tmp_path):
    # 128 images: 8 steps per epoch leave time to signal a worker mid-epoch.
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=128, num_test=24, height=12, width=12)
    # 1. Two workers train 2 epochs to completion.
    config = _mw_config(data_dir, tmp_path / "straight", epochs=2)
    straight = tmp_path / "straight"
    cluster = _Cluster(config, tmp_path).start()
    codes = cluster.wait()
    assert codes == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    assert (straight / "checkpoints" / "ckpt-2.index").exists()
    assert not (straight / "workertemp_1").exists()  # the worker's scratch saves are gone
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # one row per epoch: only the chief writes
    assert rows[-1]["knn_top1"] is not None and rows[-1]["graph_recall"] == 1.0

    # 2. The same run on one device sees the same global batches. Exact equality is
    # the mirrored test's job: over processes, this 4-channel network amplifies
    # 1e-7 differences of summation order to about 1e-2 in the bank by epoch 2, more
    # on some CPUs (per-replica BatchNorm, or workers reading the same half, give
    # about 0.2).
    one = dataclasses.replace(config, workdir=str(tmp_path / "one"), strategy="default")
    training.train_and_evaluate(one, one.workdir)
    one_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    assert rows[0]["loss"] == pytest.approx(one_rows[0]["loss"], rel=1e-4)
    # Measured on an AMD EPYC host: 0.006 max after epoch 1, 0.059 max and 0.007 mean
    # after epoch 2 (Intel Xeon: under 0.05); per-replica BatchNorm is 0.2 off.
    np.testing.assert_allclose(
        _bank(straight, "ckpt-1"), _bank(tmp_path / "one", "ckpt-1"), atol=0.02
    )
    final = np.abs(_bank(straight) - _bank(tmp_path / "one"))
    assert final.max() < 0.12 and final.mean() < 0.02, (final.max(), final.mean())

    # 3. SIGTERM to the non-chief worker mid-run: both save the same step and stop
    # (exit status 42); the cluster manager restarts both; they resume exactly.
    preempted = tmp_path / "preempted"
    cluster = _Cluster(dataclasses.replace(config, workdir=str(preempted)), tmp_path).start()
    deadline = time.time() + 240
    while not (preempted / "checkpoints" / "ckpt-1.index").exists() and time.time() < deadline:
        time.sleep(0.05)
    cluster.processes[1].send_signal(signal.SIGTERM)
    codes = cluster.wait()
    assert codes == [training.PREEMPTED_EXIT_CODE] * 2, (
        cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    )
    assert "preempted: saved" in cluster.log(0)
    assert not (preempted / "checkpoints" / "ckpt-2.index").exists()
    cluster.start()
    assert cluster.wait() == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    assert re.search(r"Resumed from .*ckpt-\d+ \(epoch \d, step \d+\)", cluster.log(1))
    rows = [json.loads(line) for line in (preempted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    np.testing.assert_allclose(_bank(preempted), _bank(straight), atol=1e-6)

    # 4. The chief's checkpoint restores in a single-process run, which trains on.
    run = workdir_lib.load_run(str(straight))
    assert run.epoch == 2
    resumed = dataclasses.replace(config, epochs=3, strategy="default")
    row = training.train_and_evaluate(resumed, resumed.workdir)
    assert row["epoch"] == 2


@pytest.mark.parametrize(
    "signal_at, saved_at",
    [(5, 7), (2, 4)],  # mid-epoch 1; right after epoch 0's last step (4 steps per epoch)
)
def test_sigterm_on_one_device_saves_and_resumes_exactly(
    tiny_idx_dir, tmp_path, signal_at, saved_at
):
    """The same preemption path without a cluster (PreemptionCheckpointHandler, local mode):
    the handler saves two steps after the signal's step."""

    class _SigtermAt(keras.callbacks.Callback):
        def __init__(self, step):
            super().__init__()
            self.step, self.seen = step, 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += 1
            if self.seen == self.step:
                os.kill(os.getpid(), signal.SIGTERM)

    straight = tiny_config(tiny_idx_dir, tmp_path / "straight", epochs=3)
    training.train_and_evaluate(straight, straight.workdir)
    config = tiny_config(tiny_idx_dir, tmp_path / "preempted", epochs=3)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(training.Preempted, match=rf"saved .*ckpt-{saved_at} at step {saved_at};"):
        training.train_and_evaluate(config, config.workdir, [_SigtermAt(signal_at)])
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back
    training.train_and_evaluate(config, config.workdir)
    np.testing.assert_array_equal(_bank(tmp_path / "preempted"), _bank(tmp_path / "straight"))
    rows = [json.loads(line) for line in (tmp_path / "preempted" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


# ---------------------------------------------------------------------------
# Mixed precision and the TPU constraints (checked on the CPU).


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_similarity_path_float32(
    policy, tiny_idx_dir, tmp_path, monkeypatch
):
    # float16 is what a GPU gets, bfloat16 what a CPU or TPU gets; both run here on the CPU.
    monkeypatch.setattr(distribute, "precision_policy", lambda strategy, mixed: policy)
    before = keras.config.dtype_policy().name
    config = tiny_config(tiny_idx_dir, tmp_path / "run", epochs=2, mixed_precision=True)
    record = _Record(tf.distribute.get_strategy())
    row = training.train_and_evaluate(config, config.workdir, [record])
    assert keras.config.dtype_policy().name == before  # the policy was only set for the build
    assert np.all(np.isfinite(record.losses)) and row["loss_inv"] is not None
    assert record.compute_dtype == policy.removeprefix("mixed_")  # the encoder's layers
    assert record.banks.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(record.banks[0], axis=1), 1.0, rtol=1e-5)
    # Under float16 a LossScaleOptimizer wrapped SGD (bfloat16 needs no loss scale); the
    # variables are float32 either way and restore into a float32 encoder for evaluation.
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-2"))
    keys = reader.get_variable_to_shape_map()
    scaled = any("loss_scale" in k or "dynamic_scale" in k for k in keys)
    assert scaled == (policy == "mixed_float16"), sorted(keys)[:20]
    run = workdir_lib.load_run(str(tmp_path / "run"))
    embedding = run.encoder(tf.zeros([2, 12, 12, 3]))["embedding"]
    assert embedding.dtype == tf.float32


def test_train_step_compiles_with_xla_and_static_shapes(tiny_idx_dir, tmp_path):
    """What TPUStrategy needs of the step, checked without a TPU: XLA compiles the whole
    step (no host-only ops, static shapes), and every input shape is static."""
    source = data.load_source("fashion_mnist", "train", str(tiny_idx_dir))
    dataset = input_pipeline.train_pipeline(
        source,
        batch_size=8,
        image_size=12,
        view="crop_flip",
        seed=0,
        epoch=0,
        global_batch_size=16,
        shard_index=1,
        num_shards=2,
    )
    for spec in dataset.element_spec:
        assert spec.shape.is_fully_defined(), spec
    plain = tiny_config(tiny_idx_dir, tmp_path / "plain", epochs=2)
    jit = tiny_config(tiny_idx_dir, tmp_path / "jit", epochs=2, jit_compile=True)
    rows = [training.train_and_evaluate(c, c.workdir) for c in (plain, jit)]
    assert rows[1]["loss_inv"] is not None
    # The same step: XLA only reorders float arithmetic (and lowers the fused BatchNorm
    # to its own kernel; one layer agrees to 1e-5, tests/encoder_test.py). Over two
    # epochs of batches of 8 those last digits drift the mean loss by about 0.3%.
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-2)
