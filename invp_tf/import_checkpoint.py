"""Import a pretrained PyTorch ResNet as a run folder: the `invp-import` command.

    python -m invp_tf.import_checkpoint --checkpoint=checkpoint.pth --workdir=runs/paper_r50

reads the authors' checkpoints (their `main.py`'s dict, with or without `module.`), bare
state_dicts, torchvision's ResNet-18/50 and MoCo v1/v2's, in torch's zip or legacy format,
without torch and without running anything the file names (`torch_checkpoint`). It writes the
run folder --workdir (flags.txt, checkpoints/, imported.json; see `pretrained`), which
invp-evaluate, invp-export, invp-embed, invp-analyze and invp-train take as a trained one, and
prints what became of every key. Every field of `pretrained.ImportConfig` is a flag.
"""

import sys

from invp_tf import command
from invp_tf import pretrained
from invp_tf import torch_checkpoint
from invp_tf import workdir as workdir_lib

_COMMAND = command.Flags(
    lambda flag_values: command.define_fields(
        pretrained.ImportConfig,
        {"normalization": pretrained.NORMALIZATION_CHOICES},
        flag_values,
    )
)


def main(argv):
    """Runs the import of the command line `argv` (see `command.parsed`)."""
    settings = pretrained.ImportConfig(**_COMMAND.values(argv))
    errors = (ValueError, FileNotFoundError, torch_checkpoint.CheckpointError)
    with command.exits_on("invp_tf.import_checkpoint", *errors):
        workdir_lib.check_output("workdir", settings.workdir)
        record = pretrained.import_checkpoint(settings)
    for line in pretrained.summary_lines(record):
        print(line)
    print(f"wrote {settings.workdir}", file=sys.stdout)


def run():
    """The `invp-import` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
