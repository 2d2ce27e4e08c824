"""kNN graph over the memory bank.

knn[j] = the k bank rows most similar to bank[j] by dot product, most similar
first, never j itself. Built between epochs. `brute_force` is the exact NumPy
oracle (chunked matmul on the host); `scann` picks its settings from the bank
size (`scann_settings`): exact scoring for small banks, a partitioned index for
larger ones, with asymmetric hashing and exact re-ranking above a million-ish
rows. `matmul` is exact too, in TensorFlow ops: a chunked similarity matmul and
top_k where the bank is (a bank given as a tensor or variable on an accelerator
is never copied to the host). `auto` picks matmul on a GPU or TPU machine and
ScaNN on a CPU (`auto_method`). Queries go in chunks, so memory stays bounded.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

METHODS = ("scann", "brute_force", "matmul", "auto")
# scann has wheels for Linux x86_64 and aarch64 only (setup.py installs it there): elsewhere
# --knn_method=scann falls back to the exact search, with one warning.
SCANN_MISSING = (
    "--knn_method=scann: the scann package is not installed (it has wheels for Linux x86_64 "
    "and aarch64 only); building the kNN graph by exact brute-force search instead (the exact "
    "graph; its time grows with the square of the bank size; pass --knn_method=brute_force "
    "to silence this)"
)
_warned_scann_missing = False
# Settings measured on the 2-core host of BENCHMARKS.md (benchmarks/graph_build.py;
# k=4, D=128, banks of 1,000 clusters; the host was shared, load 3-5):
# - Exact scoring of all rows is quadratic: 60k rows took 17.5 s; a spherical tree
#   of sqrt(N) leaves with exact scoring of 10 of them took 3.0 s, recall@4 1.000.
SCANN_BRUTE_FORCE_MAX_ROWS = 10_000
# - Exact scoring of the searched leaves grows as N * sqrt(N): 1.28M rows took 355 s.
#   Asymmetric hashing (a 4-bit code per 2 dims) scores them faster and exact
#   re-ranking of the best 64 * k brings recall back: 138-158 s, recall@4 0.996-1.000.
#   At 300k rows the two took 43 s and 40 s (both recall 1.000).
SCANN_HASHING_MIN_ROWS = 300_000
SCANN_LEAVES_TO_SEARCH = 10
# Query rows per search call: bounds the search's working memory.
QUERY_CHUNK_ROWS = 65_536
# `matmul` scores query rows in chunks of MATMUL_CHUNK_BYTES of [rows, N] float32
# similarities (peak about twice that: the copy with each row's own column masked),
# larger on an accelerator, whose matmuls want more rows at once.
MATMUL_CHUNK_BYTES = 2**28
MATMUL_ACCELERATOR_CHUNK_BYTES = 2**31


def scann_settings(num_rows, dim, k):
    """ScaNN index settings for a self-search of `num_rows` x `dim` rows.

    Returns:
      dict with "scoring" ("brute_force", "exact_leaves" or "hashing"), and for
      partitioned indexes "num_leaves" (about sqrt(N), so a leaf and the number
      of leaves grow alike), "leaves_to_search", "training_sample_size"; for
      hashing also "dims_per_block" and "reorder" (exactly re-ranked candidates).
    """
    if num_rows <= SCANN_BRUTE_FORCE_MAX_ROWS:
        return {"scoring": "brute_force"}
    num_leaves = int(round(np.sqrt(num_rows)))
    settings = {
        "scoring": "exact_leaves",
        "num_leaves": num_leaves,
        "leaves_to_search": min(SCANN_LEAVES_TO_SEARCH, num_leaves),
        "training_sample_size": min(num_rows, 250_000),
    }
    if num_rows >= SCANN_HASHING_MIN_ROWS:
        # 2 dims per 4-bit code (an odd last dim gets a block of its own).
        settings.update(scoring="hashing", dims_per_block=2 if dim > 1 else 1, reorder=64 * k)
    return settings


def _drop_self(neighbors, k):
    """[N, k+1] candidate rows -> [N, k]: removes j from row j, keeps order.

    If j is not among the candidates (ties with duplicate rows), the last
    candidate is dropped instead.
    """
    is_self = neighbors == np.arange(neighbors.shape[0])[:, None]
    # Stable argsort of the boolean moves the self entry (if any) to the end.
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(neighbors, order, axis=1)[:, :k]


def _brute_force(embeddings, k, chunk_elements=2**25):
    """Exact top-(k+1) by dot product in row chunks (memory chunk_elements floats)."""
    n = embeddings.shape[0]
    chunk_size = max(1, chunk_elements // n)
    out = np.empty((n, k + 1), np.int64)
    for start in range(0, n, chunk_size):
        sims = embeddings[start : start + chunk_size] @ embeddings.T  # [c, N]
        part = np.argpartition(-sims, k, axis=1)[:, : k + 1]  # unordered top k+1
        part_sims = np.take_along_axis(sims, part, axis=1)
        # Sort by similarity, ties by row index, so results are deterministic.
        order = np.lexsort((part, -part_sims), axis=1)
        out[start : start + chunk_size] = np.take_along_axis(part, order, axis=1)
    return out


def _scann_searcher(embeddings, num_neighbors, k=None):
    """A ScaNN dot-product searcher over `embeddings` with the settings of `scann_settings`.

    Args:
      embeddings: [N, D] float32 rows (contiguous).
      num_neighbors: neighbours a search returns by default.
      k: the graph's k that sizes the re-ranking (default num_neighbors).
    """
    try:
        import scann  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # scann has Linux x86_64 / aarch64 wheels only
        raise ImportError(
            "a ScaNN index needs the scann package (pip install scann==1.4.2, Linux x86_64 or "
            "aarch64 only)"
        ) from e
    n, dim = embeddings.shape
    settings = scann_settings(n, dim, k or num_neighbors)
    builder = scann.scann_ops_pybind.builder(embeddings, num_neighbors, "dot_product")
    if settings["scoring"] != "brute_force":
        builder = builder.tree(
            num_leaves=settings["num_leaves"],
            num_leaves_to_search=settings["leaves_to_search"],
            training_sample_size=settings["training_sample_size"],
            spherical=True,  # bank rows are unit vectors
        )
    if settings["scoring"] == "hashing":
        builder = builder.score_ah(
            settings["dims_per_block"], anisotropic_quantization_threshold=0.2
        ).reorder(settings["reorder"])
    else:
        builder = builder.score_brute_force()
    return builder.build()


def build_search_index(vectors, directory, num_neighbors=10):
    """Builds a ScaNN dot-product index over `vectors` [N, D] and saves it to `directory`.

    The settings are those of the graph builder (`scann_settings`). Load it with
    `scann.scann_ops_pybind.load_searcher(directory)`; a result r is row r of `vectors`.
    The index is saved with relative paths, so it moves with its folder.
    """
    vectors = np.ascontiguousarray(vectors, np.float32)
    searcher = _scann_searcher(vectors, min(num_neighbors, vectors.shape[0]))
    os.makedirs(directory)
    searcher.serialize(directory, relative_path=True)


def _scann(embeddings, k, query_chunk_rows=QUERY_CHUNK_ROWS):
    """Top-(k+1) by dot product with the ScaNN index of `scann_settings`."""
    n = embeddings.shape[0]
    searcher = _scann_searcher(embeddings, k + 1, k)
    out = np.empty((n, k + 1), np.int64)
    for start in range(0, n, query_chunk_rows):
        neighbors, _ = searcher.search_batched_parallel(
            embeddings[start : start + query_chunk_rows], final_num_neighbors=k + 1
        )
        out[start : start + query_chunk_rows] = neighbors
    return out


def _accelerator():
    """Name of the first logical TPU or GPU device, or None on a CPU-only machine."""
    for kind in ("TPU", "GPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return devices[0].name
    return None


def scann_available():
    """Whether `import scann` works (it is optional: Linux x86_64 / aarch64 wheels only)."""
    try:
        import scann  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        return False
    return True


def auto_method():
    """The method `auto` resolves to on this machine.

    matmul on a GPU or TPU (exact; a chunked matmul is what those chips are for).
    On a CPU, ScaNN at every size when it is installed, matmul otherwise: on the
    2-core host of BENCHMARKS.md (clustered banks, D=128, k=4, shared host, load
    5-6) ScaNN built the graph faster at every size tried, exactly up to
    SCANN_BRUTE_FORCE_MAX_ROWS: 500, 2,000 and 10,000 rows in 0.0 / 0.1 / 0.6 s
    against matmul's 0.4 / 0.4 / 1.4 s (fresh processes), 60k rows in 4.8 s
    against 28.0 s, both at recall@4 1.000. No bank size was found where matmul
    wins on a CPU.
    """
    if _accelerator() is None and scann_available():
        return "scann"
    return "matmul"


@tf.function(reduce_retracing=True)
def _top_k_block(queries, bank, start, k):
    """[c] query rows start..start+c-1 of `bank` -> [c, k] int32 most similar rows, self excluded.

    Ties go to the lower row index (tf.math.top_k), as in `_brute_force`.
    """
    sims = tf.matmul(queries, bank, transpose_b=True)  # [c, N]
    rows = tf.range(tf.shape(queries)[0])
    own = tf.stack([rows, rows + start], axis=1)  # [c, 2]: each query's own column
    sims = tf.tensor_scatter_nd_update(sims, own, tf.fill([tf.shape(queries)[0]], -np.inf))
    return tf.math.top_k(sims, k=k).indices


def _matmul(embeddings, k, chunk_bytes=None):
    """Exact [N, k] graph with TF ops, on the device that holds the bank.

    A bank given as a tensor or variable is read where it lives; a NumPy bank goes
    to the accelerator if there is one. Row chunks keep the [c, N] similarities
    within `chunk_bytes` (default MATMUL_CHUNK_BYTES, or on an accelerator
    MATMUL_ACCELERATOR_CHUNK_BYTES); only the graph comes back.
    """
    device = getattr(embeddings, "device", "") or ""
    if not any(kind in device for kind in ("GPU", "TPU")):
        device = _accelerator() or device
    on_accelerator = any(kind in device for kind in ("GPU", "TPU"))
    if chunk_bytes is None:
        chunk_bytes = MATMUL_ACCELERATOR_CHUNK_BYTES if on_accelerator else MATMUL_CHUNK_BYTES
    with tf.device(device or None):
        bank = tf.convert_to_tensor(embeddings, tf.float32)  # [N, D]
        n = bank.shape[0]
        chunk = max(1, min(n, chunk_bytes // (4 * n)))
        blocks = [
            _top_k_block(bank[start : start + chunk], bank, tf.constant(start), k)
            for start in range(0, n, chunk)
        ]
        graph = tf.concat(blocks, axis=0)
    return graph.numpy()


def build_knn_graph(embeddings, k, method="scann"):
    """kNN graph of a set of embeddings by dot product.

    Args:
      embeddings: [N, D] float32 rows (the memory bank): a NumPy array, or for
        "matmul" also a tensor or variable, which stays on its device.
      k: neighbours per row; must be < N.
      method: "scann" (falls back to "brute_force", with one warning, without the scann
        package), "brute_force" (exact, NumPy), "matmul" (exact, TF ops, on the bank's device
        or the accelerator) or "auto" (`auto_method`).

    Returns:
      [N, k] int32 numpy array; row j lists the k most similar rows to j, most
      similar first, never j itself.
    """
    if method not in METHODS:
        raise ValueError(f"knn method must be one of {METHODS}, got {method!r}")
    if not isinstance(embeddings, (tf.Tensor, tf.Variable)):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    shape = tuple(embeddings.shape)
    if len(shape) != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {shape}")
    n = shape[0]
    if not 1 <= k < n:
        raise ValueError(f"num_neighbors must be in [1, N) = [1, {n}), got {k}")
    if method == "auto":
        method = auto_method()
    if method == "matmul":
        return _matmul(embeddings, k).astype(np.int32)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if method == "scann" and not scann_available():
        global _warned_scann_missing
        if not _warned_scann_missing:
            logging.warning(SCANN_MISSING)
            _warned_scann_missing = True
        method = "brute_force"
    if method == "brute_force":
        candidates = _brute_force(embeddings, k)
    else:
        candidates = _scann(embeddings, k)
    return _drop_self(candidates, k).astype(np.int32)


def graph_recall(embeddings, knn_graph, sample_size=2000, seed=0, chunk_rows=16_384):
    """recall@k of a kNN graph against exact search on a random sample of rows.

    Exact search streams the bank in chunks of rows ([sample, chunk] similarities
    at a time, not sample x N: 2,000 x 1.28M floats would be 10 GB) and keeps a
    running exact top k per sampled row, seeded with the graph's own rows: their
    worst similarity bounds the exact k-th from below, so only the few rows that
    beat it are ever collected and merged.

    Args:
      embeddings: [N, D] rows the graph was built from.
      knn_graph: [N, k] int graph to check.
      sample_size: rows checked (all rows when N is smaller).
      seed: seed of the sample.
      chunk_rows: bank rows per similarity block.

    Returns:
      Mean over the sampled rows of |graph row & exact top-k (self excluded)| / k.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    knn_graph = np.asarray(knn_graph, np.int64)
    n, k = knn_graph.shape
    rows = np.random.default_rng(seed).choice(n, min(sample_size, n), replace=False)
    graph = knn_graph[rows]  # [S, k]
    queries = embeddings[rows]  # [S, D]
    # Running top k: (column, similarity) per sampled row; -1 / -inf are placeholders
    # for graph entries that cannot count (the row itself, repeats).
    best_cols = graph.copy()
    best_sims = np.einsum("sd,skd->sk", queries, embeddings[graph])
    earlier = np.tril(np.ones((k, k), bool), -1)  # [j, i]: i < j
    repeat = np.any((graph[:, :, None] == graph[:, None, :]) & earlier, axis=2)
    placeholder = repeat | (graph == rows[:, None]) | (graph < 0)
    best_cols[placeholder], best_sims[placeholder] = -1, -np.inf
    for start in range(0, n, chunk_rows):
        sims = queries @ embeddings[start : start + chunk_rows].T  # [S, c]
        own = np.flatnonzero((rows >= start) & (rows < start + sims.shape[1]))
        sims[own, rows[own] - start] = -np.inf  # never the row itself
        bound = best_sims.min(axis=1)[:, None]  # [S, 1]
        hit_row, hit_col = np.nonzero(sims > bound)
        if len(hit_row) > 16 * len(rows) * k:  # a poor graph: its bound lets too much in
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [S, k] best of the chunk
            hit = np.take_along_axis(sims, part, axis=1) > bound
            hit_row, hit_col = np.nonzero(hit)[0], part[hit]
        if len(hit_row):
            best_cols, best_sims = _merge_top_k(
                best_cols, best_sims, hit_row, hit_col + start, sims[hit_row, hit_col]
            )
    hits = np.sum(np.any(graph[:, :, None] == best_cols[:, None, :], axis=2) & ~placeholder)
    return float(hits) / (len(rows) * k)


def _merge_top_k(best_cols, best_sims, hit_row, hit_col, hit_sim):
    """Top k per row of the current [S, k] best entries and new (row, col, sim) hits."""
    num, k = best_cols.shape
    row = np.concatenate([np.repeat(np.arange(num), k), hit_row])
    col = np.concatenate([best_cols.ravel(), hit_col])
    sim = np.concatenate([best_sims.ravel(), hit_sim])
    # A graph row found again in the bank is a repeat: keep one copy.
    order = np.lexsort((col, row))
    again = np.zeros(len(row), bool)
    again[order[1:]] = (row[order[1:]] == row[order[:-1]]) & (col[order[1:]] == col[order[:-1]])
    again &= col >= 0
    col[again], sim[again] = -1, -np.inf
    # Rows ascending, each by similarity descending; the first k of every row stay.
    order = np.lexsort((-sim, row))
    first = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=num))[:-1]])
    keep = order[first[:, None] + np.arange(k)]  # [S, k]
    return col[keep], sim[keep]
