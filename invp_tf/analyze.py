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

from absl import app
from absl import flags

from invp_tf import analysis
from invp_tf import command

# The library's names, reachable here as before the figures moved to `analysis`.
NUM_NEIGHBORS = analysis.NUM_NEIGHBORS
NUM_SHOWN = analysis.NUM_SHOWN
neighbor_similarities = analysis.neighbor_similarities
easy_and_hard = analysis.easy_and_hard
read_metrics = analysis.read_metrics
graph_was_built = analysis.graph_was_built
_graph = analysis._graph
similarity_figure = analysis.similarity_figure
positives_figure = analysis.positives_figure
curves_figure = analysis.curves_figure
write_index = analysis.write_index
analyze = analysis.analyze


def _define_flags(flag_values):
    where = dict(flag_values=flag_values)
    return {
        "workdir": flags.DEFINE_string(
            "workdir",
            "",
            "Training run to analyze (flags.txt, checkpoints/, metrics.jsonl).",
            **where,
        ),
        "output": flags.DEFINE_string(
            "output", "", "Folder the PNGs and index.html are written to.", **where
        ),
        "compare": flags.DEFINE_string(
            "compare", "", "Optional second run (its --workdir) to compare with.", **where
        ),
        "num_anchors": flags.DEFINE_integer("num_anchors", 6, "Anchors of positives.png.", **where),
        "samples_per_class": flags.DEFINE_integer(
            "samples_per_class", 100, "Test images per class of similarity.png.", **where
        ),
    }


_COMMAND = command.Flags(_define_flags)


def main(argv):
    """Analyzes the run of the command line `argv` (see `command.parsed`)."""
    values = _COMMAND.values(argv)
    if not values["workdir"] or not values["output"]:
        raise app.UsageError("--workdir and --output are required")
    with command.exits_on("invp_tf.analyze", ValueError, FileNotFoundError):
        paths = analyze(
            values["workdir"],
            values["output"],
            compare=values["compare"] or None,
            num_anchors=values["num_anchors"],
            samples_per_class=values["samples_per_class"],
        )
    print("\n".join(paths))


def run():
    """The `invp-analyze` console command (setup.py entry point)."""
    _COMMAND.run(main)


if __name__ == "__main__":
    run()
