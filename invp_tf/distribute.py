"""tf.distribute plumbing of training: strategies, the chief, broadcasts, precision.

The train step itself needs nothing from here: `MemoryBank.update` gathers the
global batch across replicas and `InvPModel.train_step` scales the loss by the
replica count. This module holds what the epoch loop needs around it:

- `make_strategy`: `--strategy` = default | mirrored | multi_worker | tpu;
- `is_chief`: the one worker that builds the kNN graph, runs the monitors and
  writes metrics and the checkpoints users read;
- `broadcast_from_chief`: the chief's host array on every worker;
- `checkpoint_directory`: where this worker's saves go (workers other than the
  chief write to a scratch copy, which TF requires them to do, and delete it);
- `precision_policy`: the Keras dtype policy of `--mixed_precision`.
"""

import contextlib
import json
import os
import socket

import keras
import numpy as np
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def configure_cpu_devices(num_devices):
    """Splits the host CPU into `num_devices` logical devices (mirrored runs on a CPU).

    Must run before TensorFlow initialises its devices (before the first op).

    Raises:
      ValueError: num_devices < 1, or TF already started with another count.
    """
    if num_devices < 1:
        raise ValueError(f"--cpu_devices={num_devices} must be >= 1")
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_devices
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_devices:
            raise ValueError(
                f"--cpu_devices={num_devices}: TensorFlow already started with {have} CPU "
                "device(s); set it before anything runs (as `python -m invp_tf.train` does)"
            ) from None


def make_strategy(name, *, tpu="", cpu_devices=0):
    """The tf.distribute strategy of `--strategy`.

    Args:
      name: one of STRATEGIES. "default": one device. "mirrored": every local
        GPU (or the `cpu_devices` logical CPUs when there is no GPU).
        "multi_worker": MultiWorkerMirroredStrategy, cluster from TF_CONFIG.
        "tpu": TPUStrategy on the TPU at `tpu` ("" = the local TPU VM).
      tpu: address or name of the TPU (`--tpu`).
      cpu_devices: > 0 splits the CPU into that many logical devices first.

    Raises:
      ValueError: an unknown name, TF_CONFIG missing or malformed, no TPU.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name} is not one of {', '.join(STRATEGIES)}")
    if cpu_devices:
        configure_cpu_devices(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = None
        if not tf.config.list_logical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if tpu.startswith("grpc://"):
        # TF would wait for an unreachable address forever: try it first.
        host, _, port = tpu[len("grpc://") :].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=30).close()
        except (OSError, ValueError) as e:
            raise ValueError(f"--strategy=tpu: cannot reach --tpu={tpu}: {e}") from None
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        where = f"--tpu={tpu}" if tpu else "this machine (no --tpu given)"
        raise ValueError(f"--strategy=tpu: no TPU found at {where}: {e}") from None
    return tf.distribute.TPUStrategy(resolver)


def _check_tf_config():
    """Names what is wrong with TF_CONFIG before MultiWorkerMirroredStrategy hangs on it."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "--strategy=multi_worker needs TF_CONFIG, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (see README, Scaling out)'
        )
    try:
        value = json.loads(raw)
        workers = value["cluster"]["worker"]
        task = value["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not valid ({e!r}): {raw}") from None
    if task.get("type") not in ("worker", "chief"):
        raise ValueError(f"TF_CONFIG task type must be worker or chief, got {task.get('type')}")
    if task["type"] == "worker" and not 0 <= index < len(workers):
        raise ValueError(f"TF_CONFIG task index {index} is not in [0, {len(workers)})")


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """True on the one worker that writes what users read (always True off multi-worker)."""
    return bool(strategy.extended.should_checkpoint)


def worker_id(strategy):
    """This worker's task id (0 off multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if is_multi_worker(strategy) and resolver else 0


def broadcast_from_chief(strategy, array):
    """The chief's `array` on every worker.

    Multi-worker only does a collective: replica 0 of the chief contributes the
    array, every other replica zeros, and the sum is the chief's value.

    Args:
      strategy: the run's strategy.
      array: np.ndarray on the chief; on the other workers an array of the same
        shape and dtype (zeros will do), since every worker takes part in the
        collective.
    """
    if not is_multi_worker(strategy):
        return array
    template = tf.convert_to_tensor(array)
    chief = is_chief(strategy)

    def value(context):
        if chief and context.replica_id_in_sync_group == 0:
            return template
        return tf.zeros_like(template)

    values = strategy.experimental_distribute_values_from_function(value)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def checkpoint_directory(strategy, directory):
    """Where this worker saves: `directory` on the chief, a scratch copy elsewhere.

    Under MultiWorkerMirroredStrategy every worker must take part in a save;
    the others write to `<directory>/../workertemp_<id>/` and delete it after.
    """
    if is_chief(strategy):
        return directory
    return os.path.join(os.path.dirname(directory.rstrip("/")), f"workertemp_{worker_id(strategy)}")


def precision_policy(strategy, mixed_precision):
    """Keras dtype policy name: float32, or mixed_float16 on GPUs / mixed_bfloat16 elsewhere.

    TPUs and CPUs compute in bfloat16: oneDNN runs bfloat16 convolutions on AMX or
    AVX512_BF16 where the CPU has them (the demo encoder's InvP step ran 1.24x faster than
    in float32 on a 2-core AMX Xeon, BENCHMARKS.md). Either way the
    embedding, the bank and the similarity/log-sum-exp path stay float32 (exp(1 / 0.07)
    overflows float16).
    """
    if not mixed_precision:
        return "float32"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(name):
    """Builds layers under the Keras dtype policy `name`, then restores the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def local_values(strategy, variable):
    """[replicas, ...] numpy copies of a (mirrored) variable on this worker's replicas."""
    return np.stack([v.numpy() for v in strategy.experimental_local_results(variable)])
