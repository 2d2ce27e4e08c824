"""Train-step throughput: the InvP step against the bare encoder step.

    python -m benchmarks.train_step --encoder=resnet18 --width_multiplier=0.5 \
        --image_size=28 --batch_size=128 --bank_sizes=10000,60000 --num_background=1024,4096

The bare step is forward + backward + SGD of the same encoder on the same batch
with a trivial loss; the InvP step is `InvPModel.train_step` (loss against the
bank, hard negatives, propagated positives, bank update) with the invariance
term on. Synthetic inputs; median of --steps timed steps after two warm-up
steps. Appends one row per setting to BENCHMARKS.md.
"""

import statistics
import time

import keras
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import encoder as encoder_lib
from invp_tf import model as model_lib

_ENCODER = flags.DEFINE_string("encoder", "resnet18", "Backbone.")
_WIDTH = flags.DEFINE_float("width_multiplier", 0.5, "Width multiplier.")
_HEAD = flags.DEFINE_string("head", "mlp_bn", "Head.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Input side.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_BANKS = flags.DEFINE_list("bank_sizes", ["10000", "60000"], "Bank sizes N.")
_BACKGROUND = flags.DEFINE_list("num_background", ["1024", "4096"], "TopM sizes M.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps.")
_JIT = flags.DEFINE_bool("jit_compile", False, "XLA-compile both steps.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append rows to.")


def _median_seconds(step, args):
    step(*args)
    step(*args)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), step(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    batch, size = _BATCH.value, _IMAGE_SIZE.value
    encoder = encoder_lib.build_encoder(
        _ENCODER.value, head=_HEAD.value, width_multiplier=_WIDTH.value, image_size=size
    )
    images = tf.random.uniform([batch, size, size, 3])
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)

    @tf.function(jit_compile=_JIT.value)
    def bare_step(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(encoder(images, training=True)["embedding"][:, 0])
        variables = encoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    bare = batch / _median_seconds(bare_step, (images,))
    setting = (
        f"{_ENCODER.value} x{_WIDTH.value} {_HEAD.value}, {size}px, batch {batch}, "
        f"jit {'on' if _JIT.value else 'off'}"
    )
    print(f"{setting}: bare encoder step {bare:.0f} img/s")
    rows = []
    for num_examples in map(int, _BANKS.value):
        for num_background in map(int, _BACKGROUND.value):
            model = model_lib.InvPModel(
                encoder,
                num_examples,
                embedding_dim=encoder.embedding_dim,
                loss_options=dict(
                    temperature=0.1, num_background=num_background, num_layers=3, num_positives=20
                ),
            )
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
            model.invariance_weight.assign(0.6)
            data = (images, tf.range(batch), tf.zeros([batch], tf.int32))
            step = tf.function(model.train_step, jit_compile=_JIT.value)
            invp = batch / _median_seconds(step, (data,))
            overhead = bare / invp - 1.0
            print(
                f"  N={num_examples} M={num_background}: InvP step {invp:.0f} img/s "
                f"(+{overhead:.0%} time over bare)"
            )
            rows.append(
                f"train step | `python -m benchmarks.train_step "
                f"--encoder={_ENCODER.value} --width_multiplier={_WIDTH.value} "
                f"--image_size={size} --batch_size={batch}` | {report.machine()} | {setting}; "
                f"N={num_examples}, M={num_background}: bare {bare:.0f} img/s, InvP {invp:.0f} "
                f"img/s (+{overhead:.0%} step time)"
            )
    report.append_rows(_OUTPUT.value, rows)


if __name__ == "__main__":
    app.run(main)
