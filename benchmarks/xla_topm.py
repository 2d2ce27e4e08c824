"""The TopM searches under XLA: compile time and step time of the loss at a given bank size.

    python -m benchmarks.xla_topm --bank_size=1281167 --num_background=4096 --batch_size=128

Under XLA (`--jit_compile`, and on TPUs) the searches are TensorFlow ops over the dense
[B, N] similarities: no native kernel, no chunked search (they need dynamic shapes). Each
search's loss forward + gradient with respect to the batch embeddings (`losses.invp_losses`
with the invariance term) is compiled with `jit_compile=True`; the first call's seconds less
a run's are the compile time, then the median of --steps calls is the step time. Synthetic
unit-norm bank and batch, a random kNN graph. Appends one row to --output.
"""

import os
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import losses

_N = flags.DEFINE_integer("bank_size", 1_281_167, "Bank rows N.")
_M = flags.DEFINE_integer("num_background", 4096, "TopM size M.")
_B = flags.DEFINE_integer("batch_size", 128, "Batch B (per replica).")
_D = flags.DEFINE_integer("embedding_dim", 128, "Embedding dimension D.")
_SEARCH = flags.DEFINE_list("background_search", list(losses.BACKGROUND_SEARCHES), "Searches.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls after the compiling one.")
_OUTPUT = flags.DEFINE_string("output", "", "Markdown file to append a row to (empty: none).")
_NOTE = flags.DEFINE_string("machine_note", "", "Added to the machine column.")


def _unit(rng, shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_search(search, embeddings, indices, bank, graph, steps):
    """Seconds of one search's loss step under XLA: (compile, step) in wall time and in
    process CPU time (every thread; a fair figure on a loaded machine)."""

    @tf.function(jit_compile=True)
    def step(embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            instance, invariance = losses.invp_losses(
                embeddings,
                indices,
                bank,
                graph,
                temperature=0.07,
                num_background=_M.value,
                num_layers=3,
                num_positives=50,
                background_search=search,
            )
            loss = tf.reduce_mean(instance) + 0.6 * tf.reduce_mean(invariance)
        return loss, tape.gradient(loss, embeddings)

    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        tf.nest.map_structure(lambda t: t.numpy(), step(embeddings))
        return time.perf_counter() - wall, time.process_time() - cpu

    first = timed()
    runs = [timed() for _ in range(steps)]
    wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
    return {"compile": first[0] - wall, "step": wall, "compile_cpu": first[1] - cpu, "cpu": cpu}


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    n, b = _N.value, _B.value
    bank = tf.constant(_unit(rng, (n, _D.value)))
    graph = tf.constant(rng.integers(0, n, (n, 4), dtype=np.int32))
    indices = tf.constant(rng.choice(n, b, replace=False).astype(np.int32))
    embeddings = tf.constant(_unit(rng, (b, _D.value)))
    parts = []
    for search in _SEARCH.value:
        t = time_search(search, embeddings, indices, bank, graph, _STEPS.value)
        line = (
            f"{search}: compile {t['compile']:.1f} s wall ({t['compile_cpu']:.1f} CPU-s), step "
            f"{t['step']:.2f} s wall ({t['cpu']:.2f} CPU-s)"
        )
        print(line, flush=True)
        parts.append(line)
    row = (
        f"TopM searches under XLA | `python -m benchmarks.xla_topm --bank_size={n} "
        f"--num_background={_M.value} --batch_size={b}` | {report.machine()}"
        f"{', ' + _NOTE.value if _NOTE.value else ''}, load avg {os.getloadavg()[0]:.1f} | "
        f"loss forward + gradient (jit_compile=True, TensorFlow-op searches over the dense "
        f"[B, N]), N={n}, M={_M.value}, B={b}, D={_D.value}; compile = first call less a "
        f"step, step = median of {_STEPS.value}; wall seconds and process CPU seconds: "
        f"{'; '.join(parts)}"
    )
    print(row)
    if _OUTPUT.value:
        report.append_rows(_OUTPUT.value, [row])


if __name__ == "__main__":
    app.run(main)
