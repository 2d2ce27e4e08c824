"""The evaluation suite on one trained run, with its raw-pixel baselines; rows to BENCHMARKS.md.

    python -m benchmarks.evaluation --workdir=runs/demo
    python -m benchmarks.evaluation --workdir=runs/demo --protocols=knn,linear --output=

Runs `invp_tf.evaluate` for each protocol with its defaults (knn on the embedding, linear on
every block, semi with 1% of the labels), prints one table and appends one row per protocol
(command, machine, date, figures, wall time). --output= (empty) only prints.
"""

import time

from absl import app
from absl import flags

from benchmarks import report
from invp_tf import protocols

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The trained run to evaluate.")
_PROTOCOLS = flags.DEFINE_list("protocols", ["knn", "linear", "semi"], "Protocols to run.")
_LABEL_FRACTION = flags.DEFINE_float("label_fraction", 0.01, "semi: fraction of labels.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file the rows go to.")


def _summary(report_):
    best = report_["best"]
    parts = [f"{name} {r['top1']:.4f}" for name, r in report_["results"].items()]
    if best and len(report_["results"]) > 1:
        parts.append(f"best on held-out {best['block']} {best['top1']:.4f}")
    parts += [f"baseline {name} {r['top1']:.4f}" for name, r in report_["baselines"].items()]
    split = (
        f"{report_['train_split']['labelled_used']} labelled train -> "
        f"{report_['eval_split']['examples']} {report_['eval_split']['name']}"
    )
    return f"top-1: {'; '.join(parts)} ({split})"


def main(argv):
    del argv
    rows = []
    for protocol in _PROTOCOLS.value:
        overrides = {"label_fraction": _LABEL_FRACTION.value} if protocol == "semi" else {}
        settings = protocols.make_settings(_WORKDIR.value, protocol, **overrides)
        start = time.time()
        result = protocols.evaluate(settings)
        seconds = time.time() - start
        print(protocols.format_table(result))
        flag = f" --label_fraction={_LABEL_FRACTION.value}" if protocol == "semi" else ""
        command = (
            f"`python -m invp_tf.evaluate --workdir={_WORKDIR.value} --protocol={protocol}{flag}`"
        )
        rows.append(
            f"evaluate {protocol} (checkpoint epoch {result['checkpoint_epoch']}) | {command} | "
            f"{report.machine()} | {_summary(result)}; {seconds:.0f} s wall"
        )
    for row in rows:
        print(row)
    if _OUTPUT.value:
        report.append_rows(_OUTPUT.value, rows)


if __name__ == "__main__":
    app.run(main)
