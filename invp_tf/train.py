"""Pretrain an encoder with Invariance Propagation: the `invp-train` command.

    python -m invp_tf.train --flagfile=configs/fashion_mnist.flags --workdir=runs/demo

Every field of `config.Config` is a flag (an enum where `config.CHOICES` lists its values);
`main` turns them into a Config and calls `training.train_and_evaluate`, the epoch loop.
Rerunning the same command resumes from the last checkpoint in --workdir. It writes the run
folder --workdir (train has no --output) and prints the last metrics row as JSON.
"""

import json
import sys

import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from invp_tf import command
from invp_tf import config as config_lib
from invp_tf import memory_plan
from invp_tf import training
from invp_tf import workdir as workdir_lib

_COMMAND = command.Flags(
    lambda flag_values: command.define_fields(config_lib.Config, config_lib.CHOICES, flag_values),
    flags.FLAGS,  # on import: tests and benchmarks parse absl's FLAGS and read config_from_flags
)


NO_FLAGFILE = (
    "no --flagfile: the built-in defaults are the paper's ImageNet recipe (ResNet-50, 224 px, "
    "800 epochs); start from a recipe: --flagfile=configs/fashion_mnist.flags (the CPU demo), "
    "configs/cifar10_r18.flags (CIFAR-10), configs/r50.flags (ImageNet), or RUN/flags.txt "
    "(replays a run); any flag after it overrides the recipe"
)


def _flagfile_given(argv):
    """Whether the command line names a --flagfile (absl expands it before main sees argv)."""
    return any(arg.lstrip("-").split("=")[0] == "flagfile" for arg in argv[1:] if arg[:1] == "-")


def config_from_flags():
    """The Config of the parsed flags."""
    return config_lib.Config(**{name: holder.value for name, holder in _COMMAND.holders.items()})


def main(argv):
    """Trains the run of the command line `argv` (see `command.parsed`)."""
    command_line = argv if len(argv) > 1 else sys.argv  # app.run passes the program alone
    config = config_lib.Config(**_COMMAND.values(argv))
    if config.dry_run:  # the memory plan only: nothing is trained or written
        with command.exits_on("invp_tf.train", ValueError, FileNotFoundError):
            print(memory_plan.dry_run(config))
        return
    if not config.workdir:
        raise app.UsageError("--workdir is required")
    if not _flagfile_given(command_line):
        print(f"invp_tf.train: error: {NO_FLAGFILE}", file=sys.stderr)
        sys.exit(1)
    with command.exits_on("invp_tf.train", ValueError):
        workdir_lib.check_output("workdir", config.workdir)
    message = training.finished_message(config.workdir, config.epochs)
    if message:
        print(message)
        return
    try:
        errors = (ValueError, FileNotFoundError, training.TrainingError)
        with command.exits_on("invp_tf.train", *errors):
            row = training.train_and_evaluate(config, config.workdir)
    except training.Preempted as e:
        print(f"invp_tf.train: {e}", file=sys.stderr)
        sys.exit(training.PREEMPTED_EXIT_CODE)
    except tf.errors.UnavailableError as e:
        # A multi-worker peer died without SIGTERM: its collectives abort here.
        logging.debug("stopped", exc_info=True)
        reason = e.message.splitlines()[0][:300]
        print(
            f"invp_tf.train: error: lost a worker of the cluster ({reason}); restart every "
            "worker with the same command: they resume from the last checkpoint",
            file=sys.stderr,
        )
        sys.exit(1)
    print(json.dumps(row))


def run():
    """The `invp-train` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
