"""Does propagation help? Arms paired by seed against instance discrimination, with CIs.

    python -m benchmarks.study                                   # the default study
    nohup python -m benchmarks.study > runs/study/log.txt 2>&1 &  # in the background
    python -m benchmarks.study --arms=instance,invp_late --seeds=0,1,2 --dataset=fashion_mnist

Each (seed, arm) trains `configs/study_<dataset>.flags` plus the arm's flags (ARMS) into
RUNS/<dataset>/<arm>/seed<S>, then evaluates it on frozen features with all labelled
train images: weighted kNN (k=200, t=0.07) on the embedding and on the pooled backbone
(stage4), and logistic regression fitted to convergence on stage4 (C chosen on a held-out
part of train). Once per dataset it also records the strong baselines of the same split
(pixels and the encoder at random init; `invp_tf.evaluate`). The test split chooses
nothing.

Runs go seed-major, so every finished seed is a complete pair. It resumes where it
stopped: a run's training resumes from its checkpoint, finished results are kept in
benchmarks/study_results.json (in the repository, so a study outlives the machine it ran
on). After every run the section between the study markers of BENCHMARKS.md is rewritten:
per arm the mean over seeds, and for each arm the paired difference arm - reference over
the seeds both finished, its mean and 95% t-interval ("not separable" when it covers 0).
"""

import os
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

from benchmarks import report
from invp_tf import protocols
from invp_tf import workdir as workdir_lib

_QUARTER = ["--rampup_epochs=10", "--num_layers=2", "--num_positives=10"]
# Arm -> (flags added to the dataset's study flagfile, what it tests).
ARMS = {
    "instance": (["--lambda_inv=0"], "instance discrimination only (lambda_inv = 0), control"),
    "invp": ([], "InvP as the demo recipe (L_inv from epoch 2, k 4, l 3, P 50)"),
    "recipe": ([], "InvP as the recipe itself (fashion_mnist_long: from epoch 5/16, l 2, P 10)"),
    # Table 5's "KNN" positives with K matched to the recipe arm's mean |N(i)| (about 14 on
    # fashion_mnist_long seed 0): the same number of positives, found without propagation.
    "knn": (
        ["--positive_mode=knn", "--num_knn_positives=14"],
        "the recipe with the 14 nearest bank rows as positives (no propagation)",
    ),
    "invp_late": (
        ["--rampup_epochs=5", "--num_layers=2", "--num_positives=10"],
        "InvP from 50% of training, l 2 (at most 20 positives), P 10 (mining acts)",
    ),
    "invp_late_fresh": (
        ["--rampup_epochs=5", "--num_layers=2", "--num_positives=10", "--graph_features=fresh"],
        "invp_late with the graph over fresh embeddings",
    ),
    "invp_quarter": (
        _QUARTER,
        "InvP from epoch 10 (25% of the 40-epoch mnist_long schedule), l 2, P 10",
    ),
    # Hypothesis (d), M relative to N: mnist_long's N is 8,000 and its M 800 (10%).
    "invp_quarter_m200": (
        [*_QUARTER, "--num_background=200"],
        "invp_quarter with M 200 (2.5% of mnist_long's N)",
    ),
    "invp_quarter_m3200": (
        [*_QUARTER, "--num_background=3200"],
        "invp_quarter with M 3,200 (40% of mnist_long's N)",
    ),
}
METRICS = {
    "knn_embedding": "kNN top-1, embedding",
    "knn_stage4": "kNN top-1, stage4",
    "logreg_stage4": "logistic regression top-1, stage4",
}
BEGIN, END = "<!-- study table: begin -->", "<!-- study table: end -->"
RESULTS = os.path.join(report.REPO, "benchmarks", "study_results.json")

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of configs/study_<x>.flags.")
_ARMS = flags.DEFINE_list("arms", ["instance", "invp_late"], "Arms, the reference first.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every arm (the pairing).")
_RUNS = flags.DEFINE_string("runs", "runs/study", "Folder of the runs.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file of the table ('' = print).")


def _train(flagfile, arm_flags, workdir, seed):
    """Trains (or resumes) one run; returns this attempt's wall seconds."""
    os.makedirs(workdir, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "invp_tf.train",
        f"--flagfile={flagfile}",
        *arm_flags,
        f"--seed={seed}",
        f"--workdir={workdir}",
    ]
    print(f"[study] {' '.join(command[2:])}", flush=True)
    start = time.time()
    with open(os.path.join(workdir, "train_log.txt"), "a") as log:
        proc = subprocess.run(command, cwd=report.REPO, stdout=log, stderr=log, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training {workdir} failed (exit {proc.returncode}); see train_log.txt")
    return time.time() - start


def _commit():
    """The repository's commit the run was trained and evaluated with ('+' when modified)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=report.REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "invp_tf", "configs"],
            cwd=report.REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + "+" if dirty else head) or None


def _frozen(workdir, baselines):
    """kNN (embedding, stage4) and logistic regression (stage4) with all train labels."""
    knn = protocols.evaluate(
        protocols.make_settings(workdir, "knn", block="embedding,stage4", baselines=False)
    )
    linear = protocols.evaluate(
        protocols.make_settings(workdir, "linear", block="stage4", baselines=baselines)
    )
    results = {
        "knn_embedding": knn["results"]["embedding"]["top1"],
        "knn_stage4": knn["results"]["stage4"]["top1"],
        "logreg_stage4": linear["results"]["stage4"]["top1"],
        "logreg_stage4_C": linear["results"]["stage4"]["C"],
    }
    return results, linear["baselines"], linear["train_split"], linear["eval_split"]


def run_one(dataset, arm, seed, runs, study):
    """Trains and evaluates one (arm, seed) unless `study` has it; returns its result."""
    key = f"{dataset}/{arm}/seed{seed}"
    if key in study["runs"]:
        return study["runs"][key]
    flagfile = f"configs/study_{dataset}.flags"
    arm_flags = ARMS[arm][0]
    workdir = os.path.join(runs, dataset, arm, f"seed{seed}")
    seconds_path = os.path.join(workdir, "train_seconds.json")
    seconds = report.read_json(seconds_path, [])
    seconds.append(round(_train(flagfile, arm_flags, workdir, seed), 1))
    report.write_json(seconds_path, seconds)
    print(f"[study] evaluate {key}", flush=True)
    need_baselines = dataset not in study["baselines"]
    results, baselines, train_split, eval_split = _frozen(workdir, need_baselines)
    if need_baselines:
        study["baselines"][dataset] = {
            "train_split": train_split,
            "eval_split": eval_split,
            **{
                name: {k: v for k, v in b.items() if k != "held_out_top1"}
                for name, b in baselines.items()
            },
        }
    rows = workdir_lib.read_metrics(workdir)
    last = rows[-1]
    result = {
        "flags": [f"--flagfile={flagfile}", *arm_flags, f"--seed={seed}"],
        "epochs": len(rows),
        **results,
        "monitor_knn_top1": last.get("knn_top1"),
        "purity_neighbors": last.get("purity_neighbors"),
        "purity_hard": last.get("purity_hard"),
        "mean_positives": last.get("mean_positives"),
        "curve": [
            {k: r.get(k) for k in ("epoch", "knn_top1", "purity_neighbors", "purity_hard")}
            for r in rows
        ],
        "train_seconds": sum(seconds),
        "train_attempts": len(seconds),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }
    study["runs"][key] = result
    report.write_json(RESULTS, study)
    return result


def table(study, dataset, arms, seeds):
    """Markdown: the baselines, then per arm the mean and the paired difference vs arms[0]."""
    lines = []
    base = study["baselines"].get(dataset)
    if base:
        lines += [
            f"Baselines ({base['train_split']['labelled_used']} labelled train -> "
            f"{base['eval_split']['examples']} {base['eval_split']['name']}; C and k chosen on "
            "a held-out tenth of train):",
            "",
            "| baseline | top-1 |",
            "|---|---|",
        ]
        for name, b in base.items():
            if "top1" in b:
                extra = f" (k={b['k']})" if "k" in b else f" (C={b['C']})" if "C" in b else ""
                lines.append(f"| {name}{extra} | {b['top1']:.4f} |")
        lines.append("")
    runs = {arm: {} for arm in arms}
    for key, r in study["runs"].items():
        d, arm, seed = key.split("/")
        if d == dataset and arm in runs and seed[4:] in seeds:
            runs[arm][seed[4:]] = r
    ref = arms[0]
    header = "| arm | seeds | " + " | ".join(METRICS.values()) + " | purity N / H at end |"
    header += "".join(f" {name} - {ref} (mean [95% CI]) |" for name in ("kNN emb", "logreg"))
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for arm in arms:
        rs = runs[arm]
        if not rs:
            continue
        means = [np.mean([r[m] for r in rs.values()]) for m in METRICS]
        purity_n = [r["purity_neighbors"] for r in rs.values() if r["purity_neighbors"] is not None]
        purity_h = [r["purity_hard"] for r in rs.values() if r["purity_hard"] is not None]
        purity = f"{np.mean(purity_n):.3f} / {np.mean(purity_h):.3f}" if purity_n else "-"
        cells = [f"{m:.4f}" for m in means]
        diffs = []
        for metric in ("knn_embedding", "logreg_stage4"):
            common = sorted(set(rs) & set(runs[ref]))
            if arm == ref or not common:
                diffs.append("-")
                continue
            diffs.append(
                report.diff_cell(
                    *report.paired_difference(
                        [rs[s][metric] for s in common], [runs[ref][s][metric] for s in common]
                    )
                )
            )
        lines.append(
            f"| {arm}: {ARMS[arm][1]} | {','.join(sorted(rs))} | {' | '.join(cells)} | "
            f"{purity} | {' | '.join(diffs)} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = [a for a in _ARMS.value if a not in ARMS]
    if unknown:
        sys.exit(f"benchmarks.study: error: unknown arm {unknown[0]!r}; valid: {list(ARMS)}")
    flagfile = os.path.join(report.REPO, f"configs/study_{_DATASET.value}.flags")
    if not os.path.exists(flagfile):
        sys.exit(f"benchmarks.study: error: no study recipe {flagfile}")
    study = report.read_json(RESULTS, {"runs": {}, "baselines": {}})
    command = (
        f"`python -m benchmarks.study --dataset={_DATASET.value} --arms={','.join(_ARMS.value)} "
        f"--seeds={','.join(_SEEDS.value)}`"
    )
    for seed in _SEEDS.value:
        for arm in _ARMS.value:
            run_one(_DATASET.value, arm, seed, _RUNS.value, study)
            text = table(study, _DATASET.value, _ARMS.value, _SEEDS.value)
            if _OUTPUT.value:
                dataset = _DATASET.value
                begin, end = f"{BEGIN[:-4]} {dataset} -->", f"{END[:-4]} {dataset} -->"
                report.write_block(
                    _OUTPUT.value, begin, end, text, command, f"### Study: {dataset}"
                )
    print(table(study, _DATASET.value, _ARMS.value, _SEEDS.value))


if __name__ == "__main__":
    app.run(main)
