"""The paper's Table 5 ablation at small scale: six variants x seeds, one budget, one table.

    python -m benchmarks.ablation                       # all variants, seeds 1 and 2
    nohup python -m benchmarks.ablation > runs/ablation/log.txt 2>&1 &   # in the background

Each (variant, seed) trains `configs/ablation_<variant>.flags` (all include
configs/ablation_base.flags: same data slice, epochs, encoder, batch, augmentation and
schedule) into RUNS/<variant>/seed<S>, then evaluates it with `invp_tf.evaluate`: weighted
kNN (k=200, t=0.07) on the embedding with all 60k train labels, and a linear probe on the
pooled stage4 features. Runs go seed-major (every variant with the first seed before the
second). It resumes where it stopped: training resumes from the run's checkpoint, finished
evaluations are kept (RUNS/<variant>/seed<S>/eval/ablation.json). After each run the table is
rewritten between the ablation markers of BENCHMARKS.md (--output= to only print).
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

# Table 5's rows, in the paper's order, and what each changes (the flagfile says how).
VARIANTS = {
    "invp": "InvP (hard positives from propagation, TopM background)",
    "no_hard_negatives": "w/o hard negatives (background = whole bank)",
    "no_hard_positives": "w/o hard positives (all of N(i) as positives)",
    "knn_positives": "KNN positives (k+k^2+k^3 nearest instead of propagation)",
    "instance_only": "instance discrimination only (lambda_inv = 0)",
    "exact_background": "InvP with the exact background normaliser",
}
BEGIN, END = "<!-- ablation table: begin -->", "<!-- ablation table: end -->"

_RUNS = flags.DEFINE_string("runs", "runs/ablation", "Folder of the runs.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2"], "Seeds of every variant.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file of the table.")


def run_one(variant, seed, runs):
    """Trains (or resumes) and evaluates one (variant, seed); returns its result dict."""
    workdir = os.path.join(runs, variant, f"seed{seed}")
    done = os.path.join(workdir, "eval", "ablation.json")
    result = report.read_json(done)
    if result is not None:
        return result
    os.makedirs(workdir, exist_ok=True)
    flagfile = f"configs/ablation_{variant}.flags"
    times_path = os.path.join(workdir, "train_seconds.json")
    times = report.read_json(times_path) or []
    command = report.train_command(flagfile, workdir, f"--seed={seed}")
    print(f"[ablation] train {variant} seed {seed}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    proc = subprocess.run(command, check=False)
    times.append(round(time.time() - start, 1))
    report.write_json(times_path, times)
    if proc.returncode != 0:
        raise RuntimeError(f"training {workdir} failed (exit {proc.returncode})")
    print(f"[ablation] evaluate {variant} seed {seed}", flush=True)
    knn = protocols.evaluate(protocols.make_settings(workdir, "knn", baselines=False))
    linear = protocols.evaluate(
        protocols.make_settings(workdir, "linear", block="stage4", baselines=False)
    )
    rows = workdir_lib.read_metrics(workdir)
    purity = [r.get("purity_hard") for r in rows if r.get("purity_hard") is not None]
    result = {
        "variant": variant,
        "seed": int(seed),
        "flagfile": flagfile,
        "epochs": len(rows),
        "knn_top1": knn["results"]["embedding"]["top1"],
        "linear_top1": linear["results"]["stage4"]["top1"],
        "monitor_knn_top1": rows[-1].get("knn_top1") if rows else None,
        "purity_hard": purity[-1] if purity else None,
        "train_seconds": sum(times),
        "train_attempts": len(times),
    }
    report.write_json(done, result)
    return result


def _cell(values, digits=4):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results):
    """Markdown table: per variant, mean (min-max over seeds) and InvP's margin."""
    by_variant = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    ref = by_variant.get("invp", [])
    ref_knn = [r["knn_top1"] for r in ref]
    lines = [
        "| variant | seeds | kNN top-1 (k=200) | linear top-1 (stage4) | positive purity at end "
        "| train wall (min) | InvP kNN margin vs seed spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, description in VARIANTS.items():
        rs = by_variant.get(variant)
        if not rs:
            continue
        knn = [r["knn_top1"] for r in rs]
        margin = "-"
        if variant != "invp" and ref_knn:
            diff = float(np.mean(ref_knn) - np.mean(knn))
            spread = max(np.ptp(ref_knn), np.ptp(knn))
            verdict = "beats" if diff > spread else "not beyond spread"
            margin = f"{diff:+.4f} vs {spread:.4f}: {verdict}"
        lines.append(
            f"| {description} | {','.join(str(r['seed']) for r in rs)} | {_cell(knn)} | "
            f"{_cell([r['linear_top1'] for r in rs])} | "
            f"{_cell([r['purity_hard'] for r in rs], 3)} | "
            f"{_cell([r['train_seconds'] / 60 for r in rs], 1)} | {margin} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        sys.exit(
            f"benchmarks.ablation: error: unknown variant {unknown[0]!r}; valid: {list(VARIANTS)}"
        )
    results = []
    command = f"`python -m benchmarks.ablation --seeds={','.join(_SEEDS.value)}`"
    for seed in _SEEDS.value:
        for variant in _VARIANTS.value:
            results.append(run_one(variant, seed, _RUNS.value))
            text = table(results)
            if _OUTPUT.value:
                report.write_block(
                    _OUTPUT.value, BEGIN, END, text, command, "## Ablation (Table 5, small scale)"
                )
    print(table(results))


if __name__ == "__main__":
    app.run(main)
