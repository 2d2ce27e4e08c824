"""The exact TopM search on a trained bank: how often it falls back, and what that costs.

    python -m benchmarks.exact_bracket --workdir=runs/study/fashion_mnist/invp_late/seed0

The search's cost depends on the bank: when the bracket of the M-th similarity leaves
some row of a batch outside reach of the top_k of C candidates, the whole batch pays
tf.math.top_k over N. This loads the memory bank of a run's newest checkpoint, takes
--batches batches of B of its rows as anchors (the embeddings a trained encoder gives
are close to their own bank rows) and runs `topm._exact_top_mask` on their
similarities / tau three ways, alternated in one process: as TensorFlow ops with no
extra interpolations (the search before the while loop) and with the default extra
ones (the batches that fell back, and the milliseconds of each), and with the native
kernel where it builds (invp_tf/kernels.py; its sample-and-select per row has no batch
fallback to count). All give the same set, checked on every batch (the set is a
function of the similarities alone). Appends one row to BENCHMARKS.md.
"""

import os
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import topm
from invp_tf import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run whose newest checkpoint has the bank.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches of anchors.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Anchors per batch, B.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed passes over the batches, per variant.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append a row to.")


def _bank(path):
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    keys = [k for k in shapes if k.startswith("bank/") and len(shapes[k]) == 2]
    if len(keys) != 1:
        raise ValueError(f"{path}: expected one [N, D] bank variable, found {keys}")
    return reader.get_tensor(keys[0])


def main(argv):
    del argv
    workdir = _WORKDIR.value
    config = workdir_lib.read_flags(workdir)
    paths = workdir_lib.checkpoint_paths(workdir)
    if config is None or not paths:
        raise app.UsageError(f"--workdir={workdir} has no flags.txt or no checkpoint")
    path = paths[0]
    bank = tf.constant(_bank(path), tf.float32)
    n, m, c = bank.shape[0], config.num_background, topm._EXACT_CANDIDATES
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(_BATCHES.value):
        rows = rng.choice(n, _BATCH.value, replace=False).astype(np.int32)
        logits = tf.matmul(tf.gather(bank, rows), bank, transpose_b=True) / config.temperature
        batches.append((logits, tf.constant(rows)))
    default = topm._EXACT_EXTRA_INTERPOLATIONS
    fixed = topm._EXACT_INTERPOLATIONS
    native = topm._native_ops
    variants = {f"{fixed} interpolations": 0, f"up to {fixed + default}": default}
    if native() is not None:
        variants["native kernel"] = None
    searches, misses, times = {}, {}, {name: [] for name in variants}
    for name, extra in variants.items():
        # Both read when the function is traced: the TensorFlow-op search and its
        # interpolations, or the native kernel.
        topm._EXACT_EXTRA_INTERPOLATIONS = default if extra is None else extra
        topm._native_ops = native if extra is None else (lambda: None)
        searches[name] = tf.function(lambda x, e: topm._exact_top_mask(x, m, e))
        searches[name](*batches[0])
        misses[name] = (
            "-"
            if extra is None
            else sum(not bool(topm._exact_bracket(x, m, c)[2]) for x, _ in batches)
        )
    topm._EXACT_EXTRA_INTERPOLATIONS = default
    topm._native_ops = native
    for batch in batches:  # the fallback, the extra interpolations, the kernel: one set
        first, *others = (searches[name](*batch).numpy() for name in variants)
        assert all(np.array_equal(first, other) for other in others), "the sets differ"
    for _ in range(_ROUNDS.value):
        for name in variants:
            for batch in batches:
                start = time.perf_counter()
                searches[name](*batch).numpy()
                times[name].append(time.perf_counter() - start)
    parts = [
        f"{name}: "
        + (
            ""
            if misses[name] == "-"
            else f"{misses[name]} of {len(batches)} batches fell back to the top_k over N, "
        )
        + f"median {1e3 * statistics.median(times[name]):.1f} ms, mean "
        f"{1e3 * statistics.mean(times[name]):.1f} ms"
        for name in variants
    ]
    text = (
        f"bank of {path} (N={n}, M={m}, tau {config.temperature}), {len(batches)} batches of "
        f"{_BATCH.value} of its rows as anchors, {_ROUNDS.value} rounds alternated: "
        + "; ".join(parts)
    )
    print(text)
    row = (
        f"exact TopM on a trained bank | `python -m benchmarks.exact_bracket --workdir="
        f"{workdir}` | {report.machine()}, load avg {os.getloadavg()[0]:.1f} | {text}"
    )
    report.append_rows(_OUTPUT.value, [row])


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
