"""The training loop against its step: an epoch's images/s beside the InvP step alone.

    python -m benchmarks.loop                     # the demo recipe, 3 epochs of 20k images
    python -m benchmarks.loop --loop_epochs=4 --recipe=configs/fashion_mnist.flags

One process, alternating: the InvP train step alone on a fresh model (the recipe's encoder,
N, M, search and positive sets, a random kNN graph, a synthetic batch, invariance term on;
median of --step_calls after two warm-up calls), then --loop_epochs epochs of the recipe
through `train_and_evaluate` (real input pipeline, kNN graph, purity monitor, kNN monitor
after every epoch (--eval_every=1, the demo runs it every 4th), checkpoints), then the step
alone twice more: on a fresh model again, and on the loop's trained state (encoder, bank and
kNN graph restored from its last checkpoint, a real batch of its last epoch).
L_inv is on from epoch 1 (--rampup_epochs=1), so every epoch after the first trains the
same step that is timed alone.

The trained state is the step the loop runs: the exact TopM search's cost depends on the
bank (how many rows fall inside the bracket of the M-th similarity, how many anchors fall
back to a full top_k), and a fresh bank is not a trained one. Both are reported.

Per epoch with L_inv: images/s of `fit` alone and of the whole epoch (its boundary work
included), each as a ratio of the step alone on the trained state, and of the fresh-model
step (the mean of its two timings). Appends one row to BENCHMARKS.md.
"""

import dataclasses
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import config as config_lib
from invp_tf import data
from invp_tf import distribute
from invp_tf import input_pipeline
from invp_tf import model as model_lib
from invp_tf import training
from invp_tf import workdir as workdir_lib

_FLAGFILE = flags.DEFINE_string(
    "recipe", "configs/fashion_mnist.flags", "Training recipe (a flagfile without includes)."
)
_EPOCHS = flags.DEFINE_integer("loop_epochs", 3, "Epochs of the loop (L_inv from epoch 1).")
_STEPS = flags.DEFINE_integer("step_calls", 20, "Timed calls of the step alone, each time.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append a row to.")


def step_seconds(config, num_examples, steps, trained=None):
    """Median seconds of the recipe's InvP train step (L_inv on).

    trained: None for a fresh model with a random kNN graph and a synthetic batch; else
    (checkpoint path, batch): the encoder, bank and graph restored from that training
    checkpoint and this real batch of (images, indices, labels).
    """
    keras.utils.set_random_seed(config.seed)
    policy = distribute.precision_policy(tf.distribute.get_strategy(), config.mixed_precision)
    with distribute.dtype_policy(policy):
        model = model_lib.model_from_config(config, num_examples)
    model.compile(
        optimizer=keras.optimizers.SGD(
            0.01, momentum=config.optimizer_momentum, weight_decay=config.weight_decay or None
        )
    )
    rng = np.random.default_rng(0)
    b, s = config.batch_size, config.image_size
    if trained is None:
        model.knn_graph.assign(
            rng.integers(0, num_examples, (num_examples, config.num_neighbors), dtype=np.int32)
        )
        batch = (
            tf.random.uniform([b, s, s, 3]),
            tf.constant(rng.choice(num_examples, b, replace=False), tf.int32),
            tf.zeros([b], tf.int32),
        )
    else:
        path, batch = trained
        model.encoder(tf.zeros([1, s, s, 3]))  # build the variables the checkpoint fills
        workdir_lib.training_checkpoint(
            encoder=model.encoder, bank=model.memory_bank, graph=model.knn_graph
        ).restore(path).expect_partial().assert_existing_objects_matched()
    model.invariance_weight.assign(config.lambda_inv)
    step = tf.function(model.train_step)
    for _ in range(2):
        step(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), step(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def last_batch(config):
    """The first batch of the last epoch, as the loop's pipeline made it."""
    source = data.load_source(
        config.dataset, "train", config.data_dir or None, config.train_examples
    )
    pipeline = input_pipeline.train_pipeline(
        source,
        batch_size=config.batch_size,
        image_size=config.image_size,
        view=training.view_from_config(config),
        seed=config.seed,
        epoch=config.epochs - 1,
    )
    return next(iter(pipeline))


class _EpochClock(keras.callbacks.Callback):
    """Wall-clock time at the start of every epoch's fit."""

    def __init__(self):
        super().__init__()
        self.starts = []

    def on_train_begin(self, logs=None):
        self.starts.append(time.perf_counter())


def main(argv):
    del argv
    config = config_lib.Config.from_flagfile(_FLAGFILE.value)
    config = dataclasses.replace(config, epochs=_EPOCHS.value, rampup_epochs=1, eval_every=1)
    n = config.train_examples
    before = step_seconds(config, n, _STEPS.value)
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as workdir:
        training.train_and_evaluate(config, workdir, callbacks=[clock])
        end = time.perf_counter()
        rows = workdir_lib.read_metrics(workdir)
        after = step_seconds(config, n, _STEPS.value)
        checkpoint = workdir_lib.checkpoint_paths(workdir)[0]
        trained = step_seconds(config, n, _STEPS.value, (checkpoint, last_batch(config)))
    fresh_rate = config.batch_size / statistics.mean([before, after])
    step_rate = config.batch_size / trained
    images = (n // config.batch_size) * config.batch_size
    fit_rates, epoch_rates = [], []
    for epoch, row in enumerate(rows[1:], start=1):
        # An epoch's boundary work (graph, purity) comes before its fit, the kNN monitor and
        # checkpoint after it: the epoch spans from the end of the previous fit's boundary.
        wall = (clock.starts[epoch + 1] if epoch + 1 < len(clock.starts) else end) - (
            clock.starts[epoch] - (row.get("graph_seconds") or 0.0)
        )
        fit_rates.append(row["images_per_second"])
        epoch_rates.append(images / wall)
    fit_rate, epoch_rate = statistics.mean(fit_rates), statistics.mean(epoch_rates)
    text = (
        f"step alone, fresh model {config.batch_size / before:,.0f} / "
        f"{config.batch_size / after:,.0f} img/s (before / after the loop), trained state "
        f"{step_rate:,.0f} img/s; epochs 2-{len(rows)} with L_inv: fit "
        f"{', '.join(f'{r:,.0f}' for r in fit_rates)} img/s (mean {fit_rate / step_rate:.0%} of "
        f"the trained-state step, {fit_rate / fresh_rate:.0%} of the fresh one), whole epoch "
        f"{', '.join(f'{r:,.0f}' for r in epoch_rates)} img/s (mean "
        f"{epoch_rate / step_rate:.0%} / {epoch_rate / fresh_rate:.0%})"
    )
    print(text)
    row = (
        f"training loop | `python -m benchmarks.loop --recipe={_FLAGFILE.value} "
        f"--loop_epochs={_EPOCHS.value}` | {report.machine()}, load avg {os.getloadavg()[0]:.1f} | "
        f"{config.encoder} x{config.width_multiplier}, {config.image_size} px, batch "
        f"{config.batch_size}, N={n}, M={config.num_background}, {config.background_search} "
        f"TopM: {text}"
    )
    report.append_rows(_OUTPUT.value, [row])


if __name__ == "__main__":
    app.run(main)
