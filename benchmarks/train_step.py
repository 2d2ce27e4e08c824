"""Train-step throughput: the InvP step against the bare encoder step.

    python -m benchmarks.train_step --bank_sizes=60000,1281167 --num_background=4096 \
        --background_search=exact,sampled,top_k --jit=off,on

The bare step is forward + backward + SGD of the same encoder on the same batch
with a trivial loss; the InvP step is `InvPModel.train_step` (loss against the
bank, hard negatives, propagated positives, bank update) with the invariance
term on. Apart from the steps, each setting times the loss alone, forward and
gradient with respect to the batch embeddings (`losses.invp_losses`: the bank
similarity, the TopM search and the rest of the loss math), and the similarity
matmul alone (forward + gradient), so the overhead can be split.

Synthetic inputs and a random bank and graph; medians of --steps rounds after
two warm-up calls, every round timing the bare step, then the InvP step and the
loss alone of every --background_search, then the similarity matmul, once each,
so load changes hit them alike; the first two searches' speed ratio is also given
paired by round, with its 95% t-interval. --mixed_precision runs
the encoder under Keras' mixed_bfloat16 policy (CPU; mixed_float16 on a GPU);
the loss is float32 either way. Appends one row per setting to BENCHMARKS.md,
with the load average.

    python -m benchmarks.train_step --closeness_run=runs/demo --num_background=2048

measures instead how close the sampled TopM search comes to the exact one on a
training run's bank (losses and gradient, a batch of noisy bank rows).
"""

import os
import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import encoder as encoder_lib
from invp_tf import losses
from invp_tf import model as model_lib
from invp_tf import topm

_ENCODER = flags.DEFINE_string("encoder", "resnet18", "Backbone.")
_WIDTH = flags.DEFINE_float("width_multiplier", 0.5, "Width multiplier.")
_HEAD = flags.DEFINE_string("head", "mlp_bn", "Head.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Input side.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_BANKS = flags.DEFINE_list("bank_sizes", ["60000", "1281167"], "Bank sizes N.")
_BACKGROUND = flags.DEFINE_list("num_background", ["4096"], "TopM sizes M.")
# exact_ops: --background_search=exact as TensorFlow ops even where the native kernel
# runs (the search GPUs, TPUs and XLA get), to time the two in one process.
_SEARCHES = (*losses.BACKGROUND_SEARCHES, "exact_ops")
_SEARCH = flags.DEFINE_list(
    "background_search",
    list(losses.BACKGROUND_SEARCHES),
    f"TopM searches to time, of {', '.join(_SEARCHES)} (exact_ops: exact without the native "
    "kernel).",
)
_JIT = flags.DEFINE_list("jit", ["off"], "XLA compilation of both steps: off, on or both.")
_MIXED = flags.DEFINE_bool("mixed_precision", False, "Encoder under a mixed precision policy.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps.")
_CLOSENESS = flags.DEFINE_string(
    "closeness_run", "", "Instead of timing: sampled vs exact TopM on this run's bank."
)
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append rows to.")
_NOTE = flags.DEFINE_string(
    "machine_note", "", "Added to the machine column, e.g. what else ran on the machine."
)


def _round_seconds(*steps):
    """Seconds of each (function, args) pair per round, timed in alternation.

    Two warm-up calls each, then --steps rounds that call every function once, so
    a change of machine load during the run hits all of them alike.
    """
    for step, args in steps:
        step(*args)
        step(*args)
    times = [[] for _ in steps]
    for _ in range(_STEPS.value):
        for (step, args), seconds in zip(steps, times, strict=True):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), step(*args))
            seconds.append(time.perf_counter() - start)
    return times


def _bare_step(encoder, jit):
    """Forward + backward + SGD of the encoder alone, with a trivial loss."""
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)

    @tf.function(jit_compile=jit)
    def step(images):
        with tf.GradientTape() as tape:
            embedding = encoder(images, training=True)["embedding"]
            loss = tf.reduce_sum(tf.cast(embedding[:, 0], tf.float32))
        variables = encoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return step


def _loss_steps(model, embeddings, indices, jit):
    """(loss forward + gradient, similarity matmul forward + gradient) as timed steps."""
    bank, graph = model.memory_bank.bank, model.knn_graph

    @tf.function(jit_compile=jit)
    def loss_step(embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            instance, invariance = model.loss_config.losses(embeddings, indices, bank, graph)
            loss = tf.reduce_mean(instance) + 0.6 * tf.reduce_mean(invariance)
        return tape.gradient(loss, embeddings)

    @tf.function(jit_compile=jit)
    def similarity_step(embeddings):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            logits = tf.matmul(embeddings, bank, transpose_b=True)  # [B, N]
            loss = tf.reduce_sum(logits[:, ::97])  # a gradient as dense as the loss's
        return tape.gradient(loss, embeddings)

    return (loss_step, (embeddings,)), (similarity_step, (embeddings,))


def _label(search, jit):
    """The search as the table names it: which exact search ran."""
    if search == "exact_ops" or (search == "exact" and (jit or not topm._native_ops())):
        return "exact (TensorFlow ops)"
    return "exact (native kernel)" if search == "exact" else search


def _rate(images_per_second):
    return f"{images_per_second:,.0f}" if images_per_second >= 100 else f"{images_per_second:.2f}"


def _time_setting(encoder, bare_step, images, num_examples, num_background, searches, jit, rng):
    """Seconds at one (N, M): bare step, then per search (InvP step, loss alone), matmul.

    Every search gets its own model over the same bank size, and all of them are
    timed in the same alternation, so that the searches meet the same load.

    Returns:
      (bare seconds, {search: (InvP step seconds, loss seconds)}, matmul seconds,
      {search: (InvP step seconds, loss seconds) of every round}); seconds are medians.
    """
    batch = images.shape[0]
    indices = tf.constant(rng.choice(num_examples, batch, replace=False), tf.int32)
    graph = rng.integers(0, num_examples, (num_examples, 4), dtype=np.int32)
    embeddings = tf.math.l2_normalize(tf.random.normal([batch, 128]), axis=1)
    steps, similarity = [], None
    for search in searches:
        if search not in _SEARCHES:
            raise app.UsageError(f"--background_search: {search!r} is not one of {_SEARCHES}")
        model = model_lib.InvPModel(
            encoder,
            num_examples,
            embedding_dim=encoder.embedding_dim,
            loss_config=losses.LossConfig(
                temperature=0.1,
                num_background=num_background,
                num_layers=3,
                num_positives=20,
                background_search="exact" if search == "exact_ops" else search,
            ),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        model.knn_graph.assign(graph)
        model.invariance_weight.assign(0.6)
        step = tf.function(model.train_step, jit_compile=jit)
        loss_step, similarity = _loss_steps(model, embeddings, indices, jit)
        step_args = ((images, indices, tf.zeros([batch], tf.int32)),)
        if search == "exact_ops":  # traced now, without the kernel; later calls reuse it
            native = topm._native_ops
            topm._native_ops = lambda: None
            try:
                step(*step_args)
                loss_step[0](*loss_step[1])
            finally:
                topm._native_ops = native
        steps += [(step, step_args), loss_step]
    rounds = _round_seconds((bare_step, (images,)), *steps, similarity)
    seconds = [statistics.median(times) for times in rounds]
    per_search = {
        search: (seconds[1 + 2 * i], seconds[2 + 2 * i]) for i, search in enumerate(searches)
    }
    per_round = {
        search: (rounds[1 + 2 * i], rounds[2 + 2 * i]) for i, search in enumerate(searches)
    }
    return seconds[0], per_search, seconds[-1], per_round


def _closeness(path, num_background):
    """Sampled against exact TopM search on a training run's bank: a table row.

    The batch is 128 bank rows plus noise (cosine about 0.96 to their row), the
    graph the run's own; tau is the run's.
    """
    from invp_tf import workdir  # pylint: disable=g-import-not-at-top

    run = workdir.load_run(path)
    rng = np.random.default_rng(0)
    bank = run.bank.astype(np.float32)
    indices = rng.choice(len(bank), 128, replace=False).astype(np.int32)
    views = bank[indices] + 0.3 / np.sqrt(bank.shape[1]) * rng.standard_normal(
        (128, bank.shape[1])
    ).astype(np.float32)
    options = dict(
        temperature=run.config.temperature,
        num_background=num_background,
        num_layers=run.config.num_layers,
        num_positives=run.config.num_positives,
    )
    results = {}
    for search in ("exact", "sampled"):
        views_t = tf.constant(views)
        with tf.GradientTape() as tape:
            tape.watch(views_t)
            instance, invariance = losses.invp_losses(
                views_t, indices, bank, run.knn_graph, background_search=search, **options
            )
            loss = tf.reduce_mean(instance) + 0.6 * tf.reduce_mean(invariance)
        results[search] = (instance.numpy(), invariance.numpy(), tape.gradient(loss, views_t))
    (ei, ev, eg), (si, sv, sg) = results["exact"], results["sampled"]
    cosine = float(tf.reduce_sum(eg * sg) / tf.norm(eg) / tf.norm(sg))
    return (
        f"TopM search: sampled vs exact | `python -m benchmarks.train_step "
        f"--closeness_run={path} --num_background={num_background}` | {report.machine()} | "
        f"bank of {path} (N={len(bank)}, tau {options['temperature']}), M={num_background}, "
        f"batch of 128 noisy bank rows: |L_ins difference| mean {np.mean(np.abs(si - ei)):.1e}, "
        f"max {np.max(np.abs(si - ei)):.1e} (L_ins about {np.mean(ei):.2f}); |L_inv "
        f"difference| mean {np.mean(np.abs(sv - ev)):.1e}, max {np.max(np.abs(sv - ev)):.1e}; "
        f"gradient cosine {cosine:.6f}"
    )


def main(argv):
    del argv
    if _CLOSENESS.value:
        rows = [_closeness(_CLOSENESS.value, int(m)) for m in _BACKGROUND.value]
        print("\n".join(rows))
        report.append_rows(_OUTPUT.value, rows)
        return
    if _MIXED.value:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    keras.utils.set_random_seed(0)
    batch, size = _BATCH.value, _IMAGE_SIZE.value
    encoder = encoder_lib.build_encoder(
        _ENCODER.value, head=_HEAD.value, width_multiplier=_WIDTH.value, image_size=size
    )
    images = tf.random.uniform([batch, size, size, 3])
    rng = np.random.default_rng(0)
    policy = keras.mixed_precision.global_policy().name
    setting = f"{_ENCODER.value} x{_WIDTH.value} {_HEAD.value}, {size} px, batch {batch}, {policy}"
    print(
        f"{setting}\n{'jit':>3} {'N':>8} {'M':>5} {'search':>9} {'bare/s':>7} {'InvP/s':>7} "
        f"{'over':>6} {'loss ms':>8} {'loss/bare':>9} {'matmul ms':>9} {'load':>9}"
    )
    rows = []
    for jit in [{"off": False, "on": True}[value] for value in _JIT.value]:
        bare_step = _bare_step(encoder, jit)
        for num_examples in map(int, _BANKS.value):
            for num_background in map(int, _BACKGROUND.value):
                load = os.getloadavg()[0]
                bare_s, per_search, matmul_s, per_round = _time_setting(
                    encoder,
                    bare_step,
                    images,
                    num_examples,
                    num_background,
                    _SEARCH.value,
                    jit,
                    rng,
                )
                load = f"{load:.1f}/{os.getloadavg()[0]:.1f}"
                for search, (invp_s, loss_s) in per_search.items():
                    bare, invp, overhead = batch / bare_s, batch / invp_s, invp_s / bare_s - 1
                    print(
                        f"{'on' if jit else 'off':>3} {num_examples:>8} {num_background:>5} "
                        f"{search:>9} {_rate(bare):>7} {_rate(invp):>7} {overhead:>+6.0%} "
                        f"{loss_s * 1e3:>8.1f} {loss_s / bare_s:>9.0%} {matmul_s * 1e3:>9.1f} "
                        f"{load:>9}",
                        flush=True,
                    )
                    rows.append(
                        f"train step | `python -m benchmarks.train_step --encoder={_ENCODER.value} "
                        f"--width_multiplier={_WIDTH.value} --head={_HEAD.value} "
                        f"--image_size={size} --batch_size={batch} --bank_sizes={num_examples} "
                        f"--num_background={num_background} "
                        f"--background_search={','.join(_SEARCH.value)} "
                        f"--jit={'on' if jit else 'off'}"
                        f"{' --mixed_precision' if _MIXED.value else ''}` | "
                        f"{report.machine()}{', ' + _NOTE.value if _NOTE.value else ''}, load avg "
                        f"{load} (before/after) | {setting}, jit "
                        f"{'on' if jit else 'off'}; N={num_examples}, M={num_background}, TopM "
                        f"search {_label(search, jit)} (searches timed in alternation): "
                        f"bare {_rate(bare)} img/s, InvP {_rate(invp)} img/s "
                        f"({overhead:+.0%} step time); loss alone (forward + gradient) "
                        f"{loss_s * 1e3:.1f} ms = "
                        f"{loss_s / bare_s:.0%} of the bare step, of which similarity matmul "
                        f"{matmul_s * 1e3:.1f} ms"
                    )
                if len(per_round) >= 2:
                    paired = _paired_summary(per_round, jit)
                    print(paired, flush=True)
                    rows[-1] += f"; {paired}"
    report.append_rows(_OUTPUT.value, rows)


def _paired_summary(per_round, jit):
    """The first two searches' speed ratio, paired by round, for the step and the loss."""
    (first, (step_a, loss_a)), (second, (step_b, loss_b)) = list(per_round.items())[:2]
    parts = []
    for what, a, b in (("InvP step", step_a, step_b), ("loss alone", loss_a, loss_b)):
        mean, low, high = report.paired_speed_ratio(a, b)
        interval = "" if low is None else f" [{low:.3f}, {high:.3f}]"
        parts.append(f"{what} {mean:.3f}{interval}")
    return (
        f"speed {_label(first, jit)} / {_label(second, jit)}, paired by round over "
        f"{len(step_a)} rounds (geometric mean, 95% t-interval): {', '.join(parts)}"
    )


if __name__ == "__main__":
    app.run(main)
