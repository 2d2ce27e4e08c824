"""Recipe levers against a fixed target: which change lifts a CPU recipe above its bar?

    python -m benchmarks.levers --recipe=demo --levers=bf16_e18,instance_bf16_e18 --seeds=0

Each lever is the recipe's flagfile plus a few flags (LEVERS). A run trains it from scratch
into RUNS/<recipe>/<lever>/seed<S> and records what the recipe promises: the monitor's
final kNN top-1 (weighted, k=200, fresh embeddings of the recipe's training slice against
the test split, the measure the recipe header quotes), the training command's wall time,
the time inside fit and the training throughput. Results go to
benchmarks/levers_results.json (a finished run is never rerun) and the marked block of
BENCHMARKS.md, with each lever's gap to the recipe's target (TARGETS: raw pixels with k
chosen on held-out train rows of the same slice, the strongest pixel baseline).

Wall times are budgets, so they only mean something with nothing else running: every run
records the 1-minute load average before and after, and a run that resumed from a
checkpoint is marked as such (its wall time is not one run's).
"""

import os
import subprocess
import time

from absl import app
from absl import flags

from benchmarks import report
from invp_tf import workdir as workdir_lib

RESULTS = os.path.join(report.REPO, "benchmarks", "levers_results.json")
# Recipe -> (flagfile, flags every lever starts from, target kNN top-1, what the target is).
# The demo's starting flags are the values its levers were measured against
# (configs/fashion_mnist.flags before 2026-12-08, when it took tau 0.07 and bfloat16 for 20
# epochs from them); a lever's own flags come after them, so they win.
RECIPES = {
    "demo": (
        "configs/fashion_mnist.flags",
        ["--temperature=0.1", "--nomixed_precision", "--epochs=14"],
        0.8448,
        "pixels, k=3 chosen on held-out rows of the demo's 20k slice",
    ),
    "long": (
        "configs/fashion_mnist_long.flags",
        [],
        0.8692,
        "pixels, k chosen on held-out rows of the 60k train split",
    ),
}
_BF16 = "--mixed_precision"
# Recipe -> lever -> (flags added to the recipe's flagfile, what it tests).
LEVERS = {
    "demo": {
        "base": ([], "the demo before 2026-12-08 (tau 0.1, float32, 14 epochs)"),
        "bf16_e18": (
            [_BF16, "--epochs=18"],
            "bfloat16, and the time it saves spent on 18 epochs instead of 14",
        ),
        "instance_bf16_e18": (
            [_BF16, "--epochs=18", "--lambda_inv=0"],
            "bf16_e18 as instance discrimination only (the long study's kNN leans that way)",
        ),
        "tau02_bf16_e18": ([_BF16, "--epochs=18", "--temperature=0.2"], "bf16_e18 at tau 0.2"),
        "tau007_bf16_e18": (
            [_BF16, "--epochs=18", "--temperature=0.07"],
            "bf16_e18 at the paper's tau 0.07",
        ),
        "tau005_bf16_e18": ([_BF16, "--epochs=18", "--temperature=0.05"], "bf16_e18 at tau 0.05"),
        "crop05_bf16_e18": (
            [_BF16, "--epochs=18", "--crop_scale=0.5"],
            "bf16_e18 with crops down to 50% of the image (from 70%)",
        ),
    },
    "long": {
        "base": ([], "the 45-minute recipe as it is (tau 0.1)"),
        "tau007": (["--temperature=0.07"], "the demo's best lever, tau 0.07"),
    },
}


def run_one(recipe, lever, seed, runs, results):
    """Trains one (lever, seed) unless `results` has it; returns its record."""
    key = f"{recipe}/{lever}/seed{seed}"
    if key in results["runs"]:
        return results["runs"][key]
    flagfile, start_flags, goal, _ = RECIPES[recipe]
    lever_flags = [*start_flags, *LEVERS[recipe][lever][0], f"--seed={seed}"]
    workdir = os.path.join(runs, recipe, lever, f"seed{seed}")
    resumed = os.path.exists(os.path.join(workdir, "checkpoints"))
    print(f"[levers] {key}: {' '.join(lever_flags)}", flush=True)
    load_before = os.getloadavg()[0]
    log_path = os.path.join(runs, recipe, lever, f"seed{seed}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        subprocess.run(
            report.train_command(flagfile, workdir, *lever_flags),
            cwd=report.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    wall = time.perf_counter() - start
    rows = workdir_lib.read_metrics(workdir)
    knn = [[r["epoch"] + 1, r["knn_top1"]] for r in rows if r.get("knn_top1") is not None]
    record = {
        "flags": [f"--flagfile={flagfile}", *lever_flags],
        "knn_top1": knn[-1][1],
        "gap_to_target": round(knn[-1][1] - goal, 4),
        "knn_curve": knn,
        "wall_seconds": round(wall, 1),
        "fit_seconds": round(sum(r.get("train_seconds") or 0 for r in rows), 1),
        "images_per_second": round(sum(r["images_per_second"] for r in rows) / len(rows), 1),
        "resumed": resumed,
        "load_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": report.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    results["runs"][key] = record
    report.write_json(RESULTS, results)
    return record


def table(results, recipe, levers, seeds):
    """Markdown: per (lever, seed) the final kNN, its gap to the target, and the times."""
    lines = [
        "| lever | what it tests | seed | final kNN top-1 (epochs: kNN) | minus target | "
        "wall min | fit min | img/s | load 1-min before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lever in levers:
        for seed in seeds:
            r = results["runs"].get(f"{recipe}/{lever}/seed{seed}")
            if r is None:
                continue
            curve = ", ".join(f"{e}: {k:.4f}" for e, k in r["knn_curve"])
            wall = f"{r['wall_seconds'] / 60:.1f}" + (" (resumed)" if r["resumed"] else "")
            before, after = r["load_before_after"]
            lines.append(
                f"| {lever} | {LEVERS[recipe][lever][1]} | {seed} | {r['knn_top1']:.4f} "
                f"({curve}) | {r['gap_to_target']:+.4f} | {wall} | {r['fit_seconds'] / 60:.1f} "
                f"| {r['images_per_second']:.0f} | {before:.2f} / {after:.2f} |"
            )
    goal, what = RECIPES[recipe][2:]
    lines += ["", f"Target: {goal:.4f} ({what})."]
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    recipe = f.recipe
    unknown = [lever for lever in f.levers if lever not in LEVERS[recipe]]
    if unknown:
        raise app.UsageError(
            f"--levers: {unknown[0]!r} is not a lever of {recipe} ({', '.join(LEVERS[recipe])})"
        )
    results = report.read_json(RESULTS, {"runs": {}})
    command = (
        f"`python -m benchmarks.levers --recipe={recipe} --levers={','.join(f.levers)} "
        f"--seeds={','.join(f.seeds)}`"
    )
    for seed in f.seeds:
        for lever in f.levers:
            run_one(recipe, lever, int(seed), f.runs, results)
            if f.output:
                report.write_block(
                    f.output,
                    f"<!-- levers table: begin {recipe} -->",
                    f"<!-- levers table: end {recipe} -->",
                    table(results, recipe, f.levers, f.seeds),
                    command,
                    f"### Levers: {recipe}",
                )
    print(table(results, recipe, f.levers, f.seeds))


def _define_flags():
    """Defined when run as a program only, so tests can import the module's functions."""
    flags.DEFINE_enum("recipe", "demo", list(RECIPES), "Recipe whose levers to run.")
    flags.DEFINE_list("levers", ["base"], "Levers of the recipe to run, in order.")
    flags.DEFINE_list("seeds", ["0"], "Seeds of every lever.")
    flags.DEFINE_string("runs", "runs/levers", "Folder of the runs.")
    flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file of the table ('' = print).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
