"""Times the Fashion-MNIST demo and appends its result to BENCHMARKS.md.

    python -m benchmarks.demo [--flagfile=configs/fashion_mnist.flags] [--workdir=DIR]

Trains from scratch in a fresh work directory (an existing one is refused, so a
resumed run is never reported as a full one), then records the wall time, the
final kNN top-1 and the training throughput with the command, machine and date.
"""

import os
import tempfile

from absl import app
from absl import flags

from benchmarks import report

_FLAGFILE = flags.DEFINE_string("demo_flagfile", "configs/fashion_mnist.flags", "Recipe to time.")
_WORKDIR = flags.DEFINE_string("demo_workdir", "", "Fresh run directory (default: a temp dir).")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append the row to.")


def main(argv):
    del argv
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="invp_demo_")
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise app.UsageError(f"{workdir} already holds a run; give a fresh --demo_workdir")
    rows, seconds = report.train(_FLAGFILE.value, workdir)
    last = rows[-1]
    speed = sum(r["images_per_second"] for r in rows) / len(rows)
    shown = f"python -m invp_tf.train --flagfile={_FLAGFILE.value} --workdir=DIR"
    row = (
        f"demo | `{shown}` | {report.machine()} | "
        f"knn_top1 {last['knn_top1']:.4f} after {len(rows)} epochs; "
        f"{seconds / 60:.1f} min wall; {speed:.0f} img/s training"
    )
    print(row)
    report.append_rows(_OUTPUT.value, [row])


if __name__ == "__main__":
    app.run(main)
