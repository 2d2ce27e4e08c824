"""See what a run learned: the paper's Figure 2 as a command.

    python -m invp_tf.analyze --workdir=runs/demo --output=runs/demo/analysis \
        [--compare=runs/ablation_instance_only] [--num_anchors=6] [--samples_per_class=100]

Writes into --output:
  similarity.png  Fig. 2a: cosine similarity of test images to their 5 nearest
                  neighbours of the same class and of other classes.
  positives.png   Fig. 2b: for a few training anchors, the easiest and hardest
                  members of the propagated positive set N(i).
  curves.png      the training curves of metrics.jsonl.
  index.html      the three figures with captions; open it in a browser.

Labels are read only here, to look at the embedding; training never sees them.
Figures are drawn on matplotlib's Agg canvas, so no display is needed. The figures are
`analysis.analyze`; this module is its command line.
"""

import dataclasses

from absl import app

from invp_tf import analysis
from invp_tf import command
from invp_tf import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class AnalyzeFlags:
    """The flags of invp_tf.analyze: the arguments of `analysis.analyze`."""

    workdir: str = command.field(
        "", "Training run to analyze (flags.txt, checkpoints/, metrics.jsonl)."
    )
    output: str = command.field("", "Folder the PNGs and index.html are written to.")
    compare: str = command.field("", "Optional second run (its --workdir) to compare with.")
    num_anchors: int = command.field(6, "Anchors of positives.png.")
    samples_per_class: int = command.field(100, "Test images per class of similarity.png.")


_COMMAND = command.Flags(lambda flag_values: command.define_fields(AnalyzeFlags, {}, flag_values))


def main(argv):
    """Analyzes the run of the command line `argv` (see `command.parsed`)."""
    settings = AnalyzeFlags(**_COMMAND.values(argv))
    if not settings.workdir or not settings.output:
        raise app.UsageError("--workdir and --output are required")
    with command.exits_on("invp_tf.analyze", ValueError, FileNotFoundError):
        workdir_lib.check_output("output", settings.output)
        paths = analysis.analyze(
            settings.workdir,
            settings.output,
            compare=settings.compare or None,
            num_anchors=settings.num_anchors,
            samples_per_class=settings.samples_per_class,
        )
    print("\n".join(paths))


def run():
    """The `invp-analyze` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
