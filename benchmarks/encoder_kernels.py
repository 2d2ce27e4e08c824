"""The encoder's step with and without its fast kernels: fused BatchNorm and in-kernel padding.

    python -m benchmarks.encoder_kernels --image_size=56 --steps=10   # demo encoder, 56 px
    python -m benchmarks.encoder_kernels --encoder=resnet18_cifar --width_multiplier=1.0 \\
        --head=mlp --image_size=32 --steps=3 --rounds=3           # the authors' CIFAR ResNet-18

One process. Four encoders with the same weights are built, one per setting of
`encoder.FUSED_BATCH_NORM` (one FusedBatchNormV3 against Keras 3's moments and
normalisation) and `encoder.SAME_PADDING` (stride-1 convolutions padded inside the kernel
against a separate symmetric pad); each gets its own traced bare step (forward, backward,
SGD with momentum, as `benchmarks/train_step.py`). The steps then run in alternation,
--steps calls each per round, so load and thermal drift hit all four alike. Appends one row
to BENCHMARKS.md: median images/s per setting and the fast/plain ratio.
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
from benchmarks import train_step
from invp_tf import encoder as encoder_lib

# The encoder, input, precision, --steps (timed calls per round) and --output flags are
# benchmarks.train_step's, so that both benchmarks describe a step the same way.
_ENCODER, _WIDTH, _HEAD = train_step._ENCODER, train_step._WIDTH, train_step._HEAD
_SIZE, _BATCH, _STEPS = train_step._IMAGE_SIZE, train_step._BATCH, train_step._STEPS
_PRECISION, _OUTPUT = train_step._MIXED, train_step._OUTPUT
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of alternation.")

_SETTINGS = ((False, False), (True, False), (False, True), (True, True))


def _name(setting):
    fused, same = setting
    return f"{'fused' if fused else 'keras'} BN, {'in-kernel' if same else 'separate'} pad"


def _build(setting, images):
    """An encoder built and traced under one setting (both switches are read at trace time)."""
    encoder_lib.FUSED_BATCH_NORM, encoder_lib.SAME_PADDING = setting
    keras.utils.set_random_seed(0)
    model = encoder_lib.build_encoder(
        _ENCODER.value, head=_HEAD.value, width_multiplier=_WIDTH.value, image_size=_SIZE.value
    )
    step = train_step._bare_step(model, jit=False)
    step(images)  # traced now, with the switches as set
    step(images)
    return step


def main(argv):
    del argv
    if _PRECISION.value:
        keras.config.set_dtype_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(size=(_BATCH.value, _SIZE.value, _SIZE.value, 3)), tf.float32)
    load_before = os.getloadavg()[0]
    steps = {setting: _build(setting, images) for setting in _SETTINGS}
    rates = {setting: [] for setting in _SETTINGS}
    for _ in range(_ROUNDS.value):
        for setting, step in steps.items():
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                loss = step(images)
            float(loss)
            rates[setting].append(_BATCH.value * _STEPS.value / (time.perf_counter() - start))
    median = {setting: statistics.median(values) for setting, values in rates.items()}
    for setting in _SETTINGS:
        values = " ".join(f"{v:.1f}" for v in rates[setting])
        print(f"{_name(setting):>28}: img/s {values}  (median {median[setting]:.1f})")
    plain, fast = median[(False, False)], median[(True, True)]
    print(f"fast / plain: {fast / plain:.3f}")
    policy = "mixed_bfloat16" if _PRECISION.value else "float32"
    row = (
        f"encoder kernels | `python -m benchmarks.encoder_kernels --encoder={_ENCODER.value} "
        f"--width_multiplier={_WIDTH.value} --head={_HEAD.value} --image_size={_SIZE.value} "
        f"--batch_size={_BATCH.value} --steps={_STEPS.value} --rounds={_ROUNDS.value}"
        f"{' --mixed_precision' if _PRECISION.value else ''}` | {report.machine()}, load avg "
        f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (before/after) | bare step (forward, "
        f"backward, SGD), {policy}, alternated in one process, median img/s of "
        f"{_ROUNDS.value} rounds: "
        + "; ".join(f"{_name(s)} {median[s]:.1f}" for s in _SETTINGS)
        + f"; both fast / both plain {fast / plain:.3f}"
    )
    report.append_rows(_OUTPUT.value, [row])


if __name__ == "__main__":
    app.run(main)
