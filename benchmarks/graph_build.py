"""kNN graph build + propagation over the whole bank: time, recall@k, peak RSS.

    python -m benchmarks.graph_build --num_rows=60000,1281167
    python -m benchmarks.graph_build --bank=run:runs/demo
    python -m benchmarks.graph_build --num_rows=60000 --method=matmul

What the training loop does between epochs, at a given bank size:
`neighbors.build_knn_graph` (ScaNN, settings from `neighbors.scann_settings`, or
--method=matmul, the exact chunked matmul + top_k in TensorFlow),
then `propagation.propagate_all` (the [N, S] table of N(i) for every row); then,
timed apart, `neighbors.graph_recall` (recall@k against exact search on
--recall_sample rows). Each setting runs in a fresh process, so its peak RSS
(VmHWM) is its own; it includes the bank and the TensorFlow import.

Banks: `synthetic` is a mixture of --clusters von Mises-Fisher-like clusters on
the unit sphere (a random unit centre per cluster plus isotropic Gaussian noise
of norm about --spread, renormalised); `run:PATH` is the memory bank of a
training run's latest checkpoint. Appends one row per setting to BENCHMARKS.md.
"""

import multiprocessing
import os
import time

import numpy as np
from absl import app
from absl import flags

from benchmarks import report

_BANK = flags.DEFINE_string("bank", "synthetic", "synthetic, or run:PATH (a training run).")
_NUM_ROWS = flags.DEFINE_list("num_rows", ["60000", "1281167"], "Synthetic bank sizes N.")
_DIM = flags.DEFINE_integer("dim", 128, "Synthetic bank dimension D.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "Clusters of the synthetic bank.")
_SPREAD = flags.DEFINE_float(
    "spread", 0.5, "Noise norm around a synthetic cluster centre (unit) before renormalising."
)
_NUM_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 4, "k of the graph.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 3, "Propagation hops l.")
_METHOD = flags.DEFINE_string(
    "method", "scann", "neighbors.build_knn_graph method: scann, brute_force, matmul or auto."
)
_RECALL_SAMPLE = flags.DEFINE_integer("recall_sample", 2000, "Rows checked by exact search.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic bank and the recall sample.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append rows to.")
_NOTE = flags.DEFINE_string(
    "machine_note", "", "Added to the machine column, e.g. what else ran on the machine."
)


def clustered_bank(num_rows, dim, num_clusters, spread, seed, chunk_rows=100_000):
    """[num_rows, dim] float32 unit rows: a von Mises-Fisher-like mixture.

    Row = normalize(centre + spread * g / sqrt(dim)), g standard normal, centre a
    random unit vector of a uniformly drawn cluster; in high dimension the cosine
    of a row to its centre is about 1 / sqrt(1 + spread^2).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bank = np.empty((num_rows, dim), np.float32)
    for start in range(0, num_rows, chunk_rows):
        size = min(chunk_rows, num_rows - start)
        rows = centres[rng.integers(0, num_clusters, size)]
        rows += (spread / np.sqrt(dim)) * rng.standard_normal((size, dim), dtype=np.float32)
        bank[start : start + size] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return bank


def peak_rss_gb():
    """Peak resident set size of this process so far (VmHWM), in GB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kb * 1024 / 1e9


def _measure(setting, queue):
    """One setting, in its own process: puts a dict of figures on `queue`."""
    # Imported here: each spawned process pays for (and counts) its own imports.
    from invp_tf import neighbors
    from invp_tf import propagation
    from invp_tf import workdir

    if setting["bank"] == "synthetic":
        bank = clustered_bank(
            setting["num_rows"],
            setting["dim"],
            setting["clusters"],
            setting["spread"],
            setting["seed"],
        )
    else:
        bank = np.ascontiguousarray(
            workdir.load_run(setting["bank"][len("run:") :]).bank, np.float32
        )
    n, dim = bank.shape
    k = setting["num_neighbors"]
    method = setting["method"]
    if method == "auto":
        method = neighbors.auto_method()
    rss_before = peak_rss_gb()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    graph = neighbors.build_knn_graph(bank, k, method)
    build = time.perf_counter() - start
    start = time.perf_counter()
    table = propagation.propagate_all(graph, setting["num_layers"])
    propagate = time.perf_counter() - start
    rss = peak_rss_gb()
    start = time.perf_counter()
    recall = neighbors.graph_recall(bank, graph, setting["recall_sample"], seed=setting["seed"])
    queue.put(
        dict(
            num_rows=n,
            dim=dim,
            method=method,
            scann=neighbors.scann_settings(n, dim, k) if method == "scann" else {},
            build=build,
            propagate=propagate,
            recall=recall,
            recall_seconds=time.perf_counter() - start,
            mean_positives=float(np.mean(np.sum(table >= 0, axis=1))),
            rss_bank=rss_before,
            rss=rss,
            rss_with_recall=peak_rss_gb(),
            load=(load_before, os.getloadavg()[0]),
        )
    )


def _run_isolated(setting):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(setting, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv):
    del argv
    settings = []
    base = dict(
        bank=_BANK.value,
        dim=_DIM.value,
        clusters=_CLUSTERS.value,
        spread=_SPREAD.value,
        num_neighbors=_NUM_NEIGHBORS.value,
        num_layers=_NUM_LAYERS.value,
        method=_METHOD.value,
        recall_sample=_RECALL_SAMPLE.value,
        seed=_SEED.value,
    )
    command = f"python -m benchmarks.graph_build --bank={_BANK.value} --method={_METHOD.value}"
    if _BANK.value == "synthetic":
        settings = [dict(base, num_rows=int(n)) for n in _NUM_ROWS.value]
        bank_text = f"synthetic, {_CLUSTERS.value} clusters, spread {_SPREAD.value}"
        command += f" --spread={_SPREAD.value} --num_rows="
    elif _BANK.value.startswith("run:"):
        settings = [dict(base, num_rows=None)]
        bank_text = f"trained bank of {_BANK.value[4:]}"
    else:
        raise app.UsageError(f"--bank must be synthetic or run:PATH, got {_BANK.value!r}")

    header = (
        f"{'N':>9} {'D':>4} {'build s':>8} {'prop s':>7} {'total s':>8} "
        f"{'recall@k':>9} {'peak GB':>8} {'recall s':>9} {'load':>10}  scann"
    )
    print(f"bank: {bank_text}; k={_NUM_NEIGHBORS.value}, l={_NUM_LAYERS.value}\n{header}")
    rows = []
    for setting in settings:
        r = _run_isolated(setting)
        total = r["build"] + r["propagate"]
        sample_rows = min(_RECALL_SAMPLE.value, r["num_rows"])
        scann = ", ".join(f"{key}={value}" for key, value in r["scann"].items())
        print(
            f"{r['num_rows']:>9} {r['dim']:>4} {r['build']:>8.1f} {r['propagate']:>7.1f} "
            f"{total:>8.1f} {r['recall']:>9.4f} {r['rss']:>8.2f} {r['recall_seconds']:>9.1f} "
            f"{r['load'][0]:>4.1f}/{r['load'][1]:<4.1f}  {scann}",
            flush=True,
        )
        rows.append(
            f"graph build + propagation | "
            f"`{command}{setting['num_rows'] or ''}` | "
            f"{report.machine()}{', ' + _NOTE.value if _NOTE.value else ''}, load avg "
            f"{r['load'][0]:.1f} before / {r['load'][1]:.1f} after | "
            f"{bank_text}; N={r['num_rows']}, D={r['dim']}, k={_NUM_NEIGHBORS.value}, "
            f"l={_NUM_LAYERS.value}, {r['method']} ({scann or 'exact'}): "
            f"build {r['build']:.1f} s + propagation {r['propagate']:.1f} s = {total:.1f} s; "
            f"recall@{_NUM_NEIGHBORS.value} {r['recall']:.4f} on {sample_rows} rows "
            f"(exact check {r['recall_seconds']:.1f} s); peak RSS {r['rss']:.2f} GB "
            f"(bank + imports {r['rss_bank']:.2f} GB; {r['rss_with_recall']:.2f} GB with the "
            f"check); mean |N(i)| {r['mean_positives']:.1f}"
        )
    report.append_rows(_OUTPUT.value, rows)


if __name__ == "__main__":
    app.run(main)
