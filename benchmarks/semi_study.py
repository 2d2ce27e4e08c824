"""Semi-supervised fine-tuning at small scale (the paper's Table 2): does pretraining help?

    python -m benchmarks.semi_study --dataset=fashion_mnist_long   # after benchmarks.study
    nohup python -m benchmarks.semi_study --dataset=fashion_mnist_long > runs/semi.txt 2>&1 &

For each label fraction (1% and 10% of the train labels) and seed S, three arms fine-tune
the same architecture on the same class-balanced label subset (drawn with seed S) with the
same budget (epochs, batch, crop + flip augmentation) and the same learning-rate grid, the
learning rate chosen on held-out train rows outside the subset (`invp_tf.evaluate
--protocol=semi --learning_rates=...`; the test split chooses nothing):
  - the encoder pretrained by InvP (benchmarks.study's `recipe` arm, seed S),
  - the encoder pretrained by instance discrimination (its `instance` arm, seed S),
  - the same architecture from a random init (the protocol's `random_init_network`,
    computed once per subset: the second pretrained arm finds it in the baseline cache).
Results go to benchmarks/semi_results.json (resumable: a finished cell is never rerun) and
the marked table of BENCHMARKS.md: per arm the mean top-1 and each arm's paired
difference against from-scratch training with its 95% t-interval.
"""

import os
import sys
import time

import numpy as np
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import protocols

RESULTS = os.path.join(report.REPO, "benchmarks", "semi_results.json")
STUDY_RESULTS = os.path.join(report.REPO, "benchmarks", "study_results.json")
# Epochs per label fraction: about 18,000 views at 1% and 60,000 (one pretraining epoch) at
# 10% of Fashion-MNIST's 60,000 labels.
EPOCHS = {0.01: 30, 0.1: 10}
ARMS = {"recipe": "InvP-pretrained", "instance": "instance-pretrained"}
SCRATCH = "scratch"


def run_cell(dataset, arm, fraction, seed, runs, results):
    """Fine-tunes one (arm, fraction, seed) unless `results` has it; returns its record."""
    key = f"{dataset}/{fraction:g}/seed{seed}/{arm}"
    if key in results["cells"]:
        return results["cells"][key]
    if f"{dataset}/{arm}/seed{seed}" not in report.read_json(STUDY_RESULTS, {"runs": {}})["runs"]:
        return None  # its pretraining and evaluation (benchmarks.study) have not finished
    workdir = os.path.join(runs, dataset, arm, f"seed{seed}")
    out_dir = os.path.join(report.REPO, "runs", "semi_study", dataset)
    settings = protocols.make_settings(
        workdir,
        "semi",
        label_fraction=fraction,
        epochs=EPOCHS[fraction],
        learning_rates=flags.FLAGS.learning_rates,
        seed=seed,
        output=os.path.join(out_dir, f"{arm}_{fraction:g}_seed{seed}.json"),
    )
    print(f"[semi] {key}", flush=True)
    start = time.time()
    r = protocols.evaluate(settings)
    seconds = round(time.time() - start, 1)
    labelled = r["train_split"]["labelled_used"]
    common = {"labelled": labelled, "seconds": seconds, "date": time.strftime("%Y-%m-%d")}
    network = r["results"]["network"]
    results["cells"][key] = {**network, **common}
    scratch_key = f"{dataset}/{fraction:g}/seed{seed}/{SCRATCH}"
    scratch = r["baselines"]["random_init_network"]
    if scratch_key not in results["cells"]:
        results["cells"][scratch_key] = {**scratch, **common}
    report.write_json(RESULTS, results)
    return results["cells"][key]


def table(results, dataset, fractions, seeds):
    """Markdown: per fraction and arm the mean top-1 and the paired difference vs scratch."""
    lines = [
        "| labels | arm | seeds | test top-1 (mean) | learning rates chosen | "
        "arm - scratch (mean [95% CI]) |",
        "|---|---|---|---|---|---|",
    ]
    for fraction in fractions:
        cells = {
            arm: {s: results["cells"].get(f"{dataset}/{fraction:g}/seed{s}/{arm}") for s in seeds}
            for arm in (*ARMS, SCRATCH)
        }
        for arm in (*ARMS, SCRATCH):
            done = {s: c for s, c in cells[arm].items() if c}
            if not done:
                continue
            labelled = next(iter(done.values()))["labelled"]
            mean = np.mean([c["top1"] for c in done.values()])
            lrs = ", ".join(f"{c['learning_rate']:g}" for c in done.values())
            diff = "-"
            common = [s for s in done if cells[SCRATCH].get(s)]
            if arm != SCRATCH and common:
                diff = report.diff_cell(
                    *report.paired_difference(
                        [done[s]["top1"] for s in common],
                        [cells[SCRATCH][s]["top1"] for s in common],
                    )
                )
            name = ARMS.get(arm, "from scratch (random init)")
            lines.append(
                f"| {fraction:.0%} ({labelled}) | {name} | {','.join(sorted(done))} | "
                f"{mean:.4f} | {lrs} | {diff} |"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    fractions = [float(x) for x in f.fractions]
    unknown = [x for x in fractions if x not in EPOCHS]
    if unknown:
        sys.exit(f"benchmarks.semi_study: error: no budget for fraction {unknown[0]}")
    results = report.read_json(RESULTS, {"cells": {}})
    command = (
        f"`python -m benchmarks.semi_study --dataset={f.dataset} "
        f"--seeds={','.join(f.seeds)} --learning_rates={f.learning_rates}`"
    )
    for seed in f.seeds:
        for fraction in fractions:
            for arm in ARMS:
                run_cell(f.dataset, arm, fraction, int(seed), f.runs, results)
                text = table(results, f.dataset, fractions, f.seeds)
                if f.output:
                    report.write_block(
                        f.output,
                        f"<!-- semi-supervised table: begin {f.dataset} -->",
                        f"<!-- semi-supervised table: end {f.dataset} -->",
                        text,
                        command,
                        f"### Semi-supervised: {f.dataset}",
                    )
    print(table(results, f.dataset, fractions, f.seeds))


def _define_flags():
    """Defined when run as a program only, so tests can import the module's functions."""
    flags.DEFINE_string("dataset", "fashion_mnist_long", "benchmarks.study's dataset.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Label-subset seeds = pretraining seeds.")
    flags.DEFINE_list("fractions", ["0.01", "0.1"], "Label fractions.")
    flags.DEFINE_string(
        "learning_rates", "0.01,0.05,0.2", "Learning-rate grid, chosen on held-out train rows."
    )
    flags.DEFINE_string("runs", "runs/study", "Folder of benchmarks.study's runs.")
    flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file of the table ('' = print).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
