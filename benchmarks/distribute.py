"""Training throughput per --strategy: what the distributed path costs or gains.

    python -m benchmarks.distribute --strategies=default,mirrored --train_examples=5000

Trains the same recipe (`--flagfile`, cut to `--train_examples` images and
`--epochs` epochs) once per strategy, each in a fresh `python -m invp_tf.train`
process, and reports the last epoch's images/s and loss. On a machine with
GPUs, "mirrored" uses all of them; without one it splits the CPU into
`--cpu_devices` logical devices, which adds no compute: the row then measures
the overhead of the replicated step (all-reduced BatchNorm statistics, bank
gather, gradient all-reduce) on the same cores. Appends one row to BENCHMARKS.md.
"""

import os
import tempfile

import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report

_FLAGFILE = flags.DEFINE_string("flagfile_recipe", "configs/fashion_mnist.flags", "Recipe.")
_STRATEGIES = flags.DEFINE_list("strategies", ["default", "mirrored"], "--strategy values.")
_EXAMPLES = flags.DEFINE_integer("train_examples", 5000, "Training images.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs; the last one is reported (L_inv on).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 2, "Logical CPUs of mirrored without GPU.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append rows to.")


def run(strategy, workdir):
    """Trains one run; returns (last metrics row, wall seconds)."""
    extra = [
        f"--train_examples={_EXAMPLES.value}",
        f"--epochs={_EPOCHS.value}",
        f"--rampup_epochs={_EPOCHS.value - 1}",
        f"--eval_every={_EPOCHS.value}",
        f"--strategy={strategy}",
    ]
    if strategy == "mirrored" and not tf.config.list_physical_devices("GPU"):
        extra.append(f"--cpu_devices={_CPU_DEVICES.value}")
    rows, seconds = report.train(_FLAGFILE.value, workdir, *extra, quiet=True)
    return rows[-1], seconds


def main(argv):
    del argv
    gpus = len(tf.config.list_physical_devices("GPU"))
    parts = []
    with tempfile.TemporaryDirectory() as root:
        for strategy in _STRATEGIES.value:
            row, wall = run(strategy, os.path.join(root, strategy))
            devices = f"{gpus} GPUs" if gpus else f"{_CPU_DEVICES.value} logical CPUs"
            where = devices if strategy == "mirrored" else "1 device"
            parts.append(
                f"{strategy} ({where}): {row['images_per_second']:.0f} img/s in epoch "
                f"{row['epoch']} (L_inv on), loss {row['loss']:.4f}, {wall:.0f} s wall"
            )
    command = (
        f"`python -m benchmarks.distribute --strategies={','.join(_STRATEGIES.value)} "
        f"--train_examples={_EXAMPLES.value} --epochs={_EPOCHS.value}`"
    )
    what = f"{_FLAGFILE.value}, {_EXAMPLES.value} images, {_EPOCHS.value} epochs: "
    load = os.getloadavg()[0]
    machine = f"{report.machine()}, load avg {load:.1f} after"
    row = f"throughput per strategy | {command} | {machine} | {what}" + "; ".join(parts)
    report.append_rows(_OUTPUT.value, [row])
    print("\n".join(parts))


if __name__ == "__main__":
    app.run(main)
