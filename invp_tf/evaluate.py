"""Evaluate a trained run: weighted kNN, per-block linear probe, semi-supervised, transfer.

    python -m invp_tf.evaluate --workdir=runs/demo --protocol=knn
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=linear            # all blocks
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=semi --label_fraction=0.01
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=finetune --dataset=mnist

Every field of `protocols.EvalConfig` is a flag (an enum where `protocols.CHOICES` lists its
values). --k and --temperature are deprecated spellings of --knn_k and --knn_temperature: they
still work, warn once, and go in the next release.
The encoder is rebuilt from the run's flags.txt and its latest checkpoint. Every protocol
prints a table with raw-pixel baselines on the same split beside the result (weighted kNN
and logistic regression on pixels; cached per inputs, see invp_tf/baselines.py), writes a
JSON result (--output, default WORKDIR/eval/PROTOCOL.json) and TensorBoard scalars
(WORKDIR/eval/tensorboard/PROTOCOL).
"""

from invp_tf import command
from invp_tf import protocols
from invp_tf import workdir as workdir_lib


def _define_flags(flag_values):
    """The flags of EvalConfig's fields, and the deprecated spellings --k and --temperature."""
    holders = command.define_fields(protocols.EvalConfig, protocols.CHOICES, flag_values)
    command.define_deprecated_alias("k", "knn_k", flag_values)
    command.define_deprecated_alias("temperature", "knn_temperature", flag_values)
    return holders


_COMMAND = command.Flags(_define_flags)


def main(argv):
    """Runs the evaluation of the command line `argv` (see `command.parsed`)."""
    values = _COMMAND.values(argv)
    with command.exits_on("invp_tf.evaluate", ValueError, FileNotFoundError):
        settings = protocols.make_settings(values.pop("workdir"), values.pop("protocol"), **values)
        # --output, or its default in the run folder: checked before minutes of evaluation.
        workdir_lib.check_output("output", protocols.output_path(settings), "file")
        report = protocols.evaluate(settings)
    print(protocols.format_table(report))
    print(f"wrote {report['output']}")


def run():
    """The `invp-evaluate` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
