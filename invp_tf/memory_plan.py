"""The memory a run needs on each replica, worked out before the first step.

    plan = memory_plan.make_plan(config, num_examples, replicas=1, encoder=encoder)
    print(plan.table())
    plan.check(budget_bytes)   # ValueError in one line naming the largest term

Terms, per replica, in bytes (B_local = --batch_size / replicas, N bank rows, D = the
embedding dimension, M = --num_background):

- bank: N x D float32 (every replica holds the whole bank); graph: N x k int32.
- similarity: the [B_local, N] float32 similarities, or, where the exact and sampled
  searches score the bank in chunks (N >= 64 M, propagation positives, outside XLA), one
  [B_local, 16384] chunk and the listed entries (about 1.4 M per row for exact).
- similarity gradient: its [B_local, N] float32 gradient, or the [B_local x M, D] gather
  of TopM's bank rows in the chunked searches.
- TopM workspace: what the search holds beside them: the [B_local, N] TopM mask (1 byte),
  plus a float32 copy for the TensorFlow-op exact search (GPUs, TPUs, XLA) and for top_k.
  (The log-sum-exp's masked exponentials become the gradient: not counted twice.)
- activations: the float outputs of every op of the encoder's forward pass per image
  (traced once, in the run's dtype policy) x B_local: an upper estimate of what
  backpropagation keeps (on a CPU, ResNet-18 x0.5 at 64 and 96 px, batch 64, the peak RSS
  grew by 0.73x what this term grew between the two sizes).
- weights: trainable weights, their gradients and SGD momentum (3 x float32), plus the
  non-trainable ones.
- runtime: what a step holds whatever the sizes (the traced functions, the allocator's
  slack): 0.2 GB, measured on a CPU (a GPU's CUDA context comes on top).

The arithmetic is checked against the peak RSS of training steps on a CPU
(tests/memory_plan_test.py).
"""

import dataclasses
import shutil
import subprocess

import keras
import tensorflow as tf
from absl import logging

from invp_tf import data
from invp_tf import distribute
from invp_tf import model as model_lib
from invp_tf import topm

# Entries the exact chunked search lists per row, in units of M (its lower bound).
_EXACT_LISTED = 1.4
# Bytes per listed entry: row, column, position (int32) and value (float32).
_ENTRY_BYTES = 16
# Peak RSS growth of InvP steps on a CPU less the [B, N] and [N, *] terms, at three sizes
# (tests/memory_plan_test.py): 0.16-0.2 GB.
RUNTIME_BYTES = 200_000_000

# What to change when a term is the largest.
_ADVICE = {
    "bank": "the bank is N x D float32 on every replica: lower --embedding_dim, or train on "
    "a device with more memory",
    "graph": "the kNN graph is N x k int32 on every replica: lower --num_neighbors",
    "similarity": "lower --batch_size (or spread it over more replicas with --strategy), or use "
    "--background_search=exact or sampled without --jit_compile, which score the bank in "
    "chunks from N >= 64 x --num_background",
    "activations": "lower --batch_size (or spread it over more replicas with --strategy), or "
    "turn on --mixed_precision",
    "weights": "lower --width_multiplier or use a smaller --encoder",
    "runtime": "use a device with more memory",
}
_ADVICE["similarity gradient"] = _ADVICE["similarity"]
_ADVICE["TopM workspace"] = _ADVICE["similarity"]

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per replica of each term (`terms`, in print order) and what they assume."""

    terms: dict
    batch_per_replica: int
    replicas: int
    search: str  # which TopM search the step runs, in words

    @property
    def total(self):
        return sum(self.terms.values())

    def largest(self):
        """(name, bytes) of the largest term."""
        return max(self.terms.items(), key=lambda item: item[1])

    def table(self):
        """The plan as printable lines."""
        lines = [
            f"memory plan per replica ({self.replicas} replica(s), batch {self.batch_per_replica} "
            f"each; TopM search: {self.search}):"
        ]
        lines += [f"  {name:<20} {value / GB:9.3f} GB" for name, value in self.terms.items()]
        lines.append(f"  {'total':<20} {self.total / GB:9.3f} GB")
        return "\n".join(lines)

    def check(self, budget_bytes):
        """Raises ValueError (one line) when the total exceeds `budget_bytes` (None: no check)."""
        if budget_bytes is None or self.total <= budget_bytes:
            return
        name, value = self.largest()
        raise ValueError(
            f"memory plan: {self.total / GB:.2f} GB per replica exceeds the device's "
            f"{budget_bytes / GB:.2f} GB; the largest term is the {name} ({value / GB:.2f} GB): "
            f"{_ADVICE[name]} (invp-train --dry_run prints the whole plan; its activations "
            "are an upper estimate, and --device_memory_gb sets the budget)"
        )


def search_path(config, num_examples, *, accelerator, native):
    """(chunked: bool, the TopM search in words) that the step runs for `config`."""
    m, n, search = config.num_background, num_examples, config.background_search
    if not config.hard_negatives or m >= n:
        return False, "none (TopM is the whole bank)"
    chunked = (
        search in ("exact", "sampled")
        and config.positive_mode == "propagation"
        and n >= topm.COMPACT_MIN_RATIO * m
        and not config.jit_compile
    )
    if search == "exact":
        kernel = native and not accelerator and not config.jit_compile
        words = "exact, native kernel" if kernel else "exact, TensorFlow ops"
    else:
        words = search
    return chunked, words + (", in bank chunks" if chunked else ", dense [B, N]")


def activation_bytes_per_image(encoder, image_size):
    """Bytes of the float outputs of every op of one image's forward pass (training mode).

    The forward pass is traced (not run) for a [1, S, S, 3] input; an op counts when it
    depends on the input, so weights and their casts do not.
    """
    fn = tf.function(lambda images: encoder(images, training=True))
    graph = fn.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3])).graph
    reached, total = set(), 0
    for op in graph.get_operations():
        if op.type == "Placeholder" and op.outputs and op.outputs[0].dtype == tf.float32:
            if op.outputs[0].shape.as_list() == [1, image_size, image_size, 3]:
                reached.add(op.outputs[0].ref())
            continue
        if not any(x.ref() in reached for x in op.inputs):
            continue
        for out in op.outputs:
            reached.add(out.ref())
            if op.type in ("Identity", "ReadVariableOp", "Shape", "Reshape", "ExpandDims"):
                continue  # views of another tensor
            if out.dtype.is_floating and out.shape.is_fully_defined():
                total += out.shape.num_elements() * out.dtype.size
    return total


def weight_bytes(encoder):
    """Trainable weights x 3 (weight, gradient, momentum) + non-trainable, float32."""
    trainable = sum(v.shape.num_elements() for v in encoder.trainable_variables)
    frozen = sum(v.shape.num_elements() for v in encoder.non_trainable_variables)
    return 4 * (3 * trainable + frozen)


def make_plan(config, num_examples, *, replicas=1, encoder=None, accelerator=None, native=True):
    """The MemoryPlan of `config` over `num_examples` bank rows.

    Args:
      config: a config.Config.
      num_examples: N.
      replicas: replicas the global batch is split over.
      encoder: the run's encoder (built, in the run's dtype policy); None leaves the
        activations and weights out (0).
      accelerator: whether the step runs on a GPU or TPU (None: whether one is visible).
      native: whether the native CPU kernels are available.
    """
    if accelerator is None:
        accelerator = bool(
            tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
        )
    b = max(1, config.batch_size // max(1, replicas))
    n, d, m = num_examples, config.embedding_dim, min(config.num_background, num_examples)
    chunked, words = search_path(config, num_examples, accelerator=accelerator, native=native)
    if chunked:
        listed = _EXACT_LISTED * m if config.background_search == "exact" else m
        similarity = b * topm.CHUNK_ROWS * 4 + int(b * listed * _ENTRY_BYTES)
        gradient = b * m * d * 4
        workspace = b * m * _ENTRY_BYTES  # TopM's entries and their exponentials
    else:
        similarity = gradient = b * n * 4
        workspace = b * n  # the TopM mask
        tensorflow_ops = "TensorFlow ops" in words or config.background_search == "top_k"
        if tensorflow_ops and "none" not in words:
            workspace += b * n * 4  # the masked copy the bracket's top_k (or top_k) reads
    terms = {
        "bank": n * d * 4,
        "graph": n * config.num_neighbors * 4,
        "similarity": similarity,
        "similarity gradient": gradient,
        "TopM workspace": workspace,
        "activations": 0,
        "weights": 0,
        "runtime": RUNTIME_BYTES,
    }
    if encoder is not None:
        terms["activations"] = b * activation_bytes_per_image(encoder, config.image_size)
        terms["weights"] = weight_bytes(encoder)
    return MemoryPlan(terms=terms, batch_per_replica=b, replicas=replicas, search=words)


def nvidia_smi(fields, units=True):
    """The lines of `nvidia-smi --query-gpu=FIELDS` (CSV, no header), or None (no tool)."""
    fmt = "csv,noheader" + ("" if units else ",nounits")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", f"--format={fmt}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_memory_bytes():
    """The first GPU's total memory as nvidia-smi reports it, or None (no GPU, no tool)."""
    if not tf.config.list_physical_devices("GPU") or not shutil.which("nvidia-smi"):
        return None
    lines = nvidia_smi("memory.total", units=False)
    try:
        return int(lines[0]) * 2**20  # MiB
    except (TypeError, ValueError, IndexError):
        return None


def budget_bytes(device_memory_gb):
    """The budget of --device_memory_gb (> 0), else the device's reported memory, else None."""
    if device_memory_gb > 0:
        return device_memory_gb * GB
    return device_memory_bytes()


def for_config(config, num_examples, strategy):
    """The plan of a run: its encoder built (and dropped) in the run's dtype policy."""
    policy = distribute.precision_policy(strategy, config.mixed_precision)
    with distribute.dtype_policy(policy):
        encoder = model_lib.encoder_from_config(config)
    return make_plan(config, num_examples, replicas=strategy.num_replicas_in_sync, encoder=encoder)


def check_config(config, num_examples, strategy):
    """Logs the run's plan; ValueError in one line when it exceeds the device's memory."""
    plan = for_config(config, num_examples, strategy)
    # Building the plan's encoder drew initial weights from Keras' global generator: seed
    # it again (as training did just before), so the run's own encoder starts the same.
    keras.utils.set_random_seed(config.seed)
    logging.info("%s", plan.table())
    plan.check(budget_bytes(config.device_memory_gb))
    return plan


def dry_run(config):
    """`invp-train --dry_run`: the plan of `config` and its verdict, as printable lines.

    Raises:
      ValueError: a flag that cannot work, or a plan over --device_memory_gb (one line).
    """
    strategy = distribute.make_strategy(
        config.strategy, tpu=config.tpu, cpu_devices=config.cpu_devices
    )
    data_dir = config.data_dir or None
    source = data.load_source(config.dataset, "train", data_dir, config.train_examples)
    config.validate(source.num_examples)
    plan = check_config(config, source.num_examples, strategy)
    budget = budget_bytes(config.device_memory_gb)
    verdict = (
        "no device memory known (no GPU): pass --device_memory_gb to check the plan"
        if budget is None
        else f"fits the device's {budget / GB:.2f} GB"
    )
    return f"{plan.table()}\n{verdict}"
