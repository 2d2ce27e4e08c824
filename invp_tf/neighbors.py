"""Host-side kNN graph over the memory bank; the only module that imports scann.

knn[j] = the k bank rows most similar to bank[j] by dot product, most similar
first, never j itself. Built between epochs, on the host, from a NumPy copy of
the bank. `brute_force` is the exact oracle (chunked matmul); `scann` uses
ScaNN's exact brute-force scorer for small banks and a partitioned, quantised
index with exact re-ranking for large ones.
"""

import numpy as np

METHODS = ("scann", "brute_force")
# Below this many rows ScaNN's exact brute-force scorer is fast enough
# (FACTS.md: 60k x 128 self-search in 15 s on 2 cores).
SCANN_EXACT_MAX_ROWS = 100_000


def _drop_self(neighbors, k):
    """[N, k+1] candidate rows -> [N, k]: removes j from row j, keeps order.

    If j is not among the candidates (ties with duplicate rows), the last
    candidate is dropped instead.
    """
    is_self = neighbors == np.arange(neighbors.shape[0])[:, None]
    # Stable argsort of the boolean moves the self entry (if any) to the end.
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(neighbors, order, axis=1)[:, :k]


def _brute_force(embeddings, k, chunk_size=2048):
    """Exact top-(k+1) by dot product in row chunks (memory chunk x N)."""
    n = embeddings.shape[0]
    out = np.empty((n, k + 1), np.int64)
    for start in range(0, n, chunk_size):
        sims = embeddings[start : start + chunk_size] @ embeddings.T  # [c, N]
        part = np.argpartition(-sims, k, axis=1)[:, : k + 1]  # unordered top k+1
        part_sims = np.take_along_axis(sims, part, axis=1)
        # Sort by similarity, ties by row index, so results are deterministic.
        order = np.lexsort((part, -part_sims), axis=1)
        out[start : start + chunk_size] = np.take_along_axis(part, order, axis=1)
    return out


def _scann(embeddings, k):
    try:
        import scann  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # scann is Linux/x86 only
        raise ImportError(
            "--knn_method=scann needs the scann package (pip install scann==1.4.2); "
            "use --knn_method=brute_force without it"
        ) from e
    n = embeddings.shape[0]
    builder = scann.scann_ops_pybind.builder(embeddings, k + 1, "dot_product")
    if n <= SCANN_EXACT_MAX_ROWS:
        searcher = builder.score_brute_force().build()
    else:
        num_leaves = int(2 * np.sqrt(n))
        searcher = (
            builder.tree(
                num_leaves=num_leaves,
                num_leaves_to_search=max(num_leaves // 20, 10),
                training_sample_size=min(n, 250_000),
            )
            .score_ah(2, anisotropic_quantization_threshold=0.2)
            .reorder(100)
            .build()
        )
    neighbors, _ = searcher.search_batched(embeddings, final_num_neighbors=k + 1)
    return np.asarray(neighbors, np.int64)


def build_knn_graph(embeddings, k, method="scann"):
    """kNN graph of a set of embeddings by dot product.

    Args:
      embeddings: [N, D] float32 rows (the memory bank).
      k: neighbours per row; must be < N.
      method: "scann" or "brute_force" (exact).

    Returns:
      [N, k] int32 numpy array; row j lists the k most similar rows to j, most
      similar first, never j itself.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"num_neighbors must be in [1, N) = [1, {n}), got {k}")
    if method == "brute_force":
        candidates = _brute_force(embeddings, k)
    elif method == "scann":
        candidates = _scann(embeddings, k)
    else:
        raise ValueError(f"knn method must be one of {METHODS}, got {method!r}")
    return _drop_self(candidates, k).astype(np.int32)


def graph_recall(embeddings, knn_graph, sample_size=2000, seed=0):
    """recall@k of a kNN graph against exact search on a random sample of rows.

    Args:
      embeddings: [N, D] rows the graph was built from.
      knn_graph: [N, k] int graph to check.
      sample_size: rows checked (all rows when N is smaller).
      seed: seed of the sample.

    Returns:
      Mean over the sampled rows of |graph row & exact top-k (self excluded)| / k.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, k = knn_graph.shape
    rows = np.random.default_rng(seed).choice(n, min(sample_size, n), replace=False)
    sims = embeddings[rows] @ embeddings.T  # [S, N]
    sims[np.arange(len(rows)), rows] = -np.inf
    exact = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # unordered exact top k
    hits = [
        len(set(a.tolist()) & set(b.tolist())) for a, b in zip(knn_graph[rows], exact, strict=True)
    ]
    return float(np.sum(hits)) / (len(rows) * k)
