"""See what a run learned: the paper's Figure 2 (the library of `invp_tf.analyze`).

`analyze(workdir, output_dir)` writes similarity.png (Fig. 2a: test images' similarity to their
nearest neighbours of the same and of other classes), positives.png (Fig. 2b: the easiest and
hardest propagated positives of a few anchors), curves.png (metrics.jsonl) and index.html,
which shows the three with captions.

Labels are read only here, to look at the embedding; training never sees them.
Figures are drawn on matplotlib's Agg canvas, so no display is needed.
"""

import functools
import html
import os

import numpy as np
import tensorflow as tf
from matplotlib import figure as figure_lib
from matplotlib import ticker
from matplotlib.backends import backend_agg

from invp_tf import data
from invp_tf import evaluation
from invp_tf import input_pipeline
from invp_tf import neighbors
from invp_tf import propagation
from invp_tf import workdir as workdir_lib

NUM_NEIGHBORS = 5  # neighbours per test image in Fig. 2a, as in the paper
NUM_SHOWN = 8  # easiest / hardest positives shown per anchor in Fig. 2b
# Curves panels: (title, metric keys); a panel is drawn when any of its keys has a value.
CURVE_PANELS = (
    ("losses", ("loss_ins", "loss_inv")),
    ("kNN top-1 (test)", ("knn_top1",)),
    ("positives sharing the anchor's label", ("purity_neighbors", "purity_hard")),
    ("kNN graph recall", ("graph_recall",)),
    ("mean |N(i)|", ("mean_positives",)),
)


# ---------------------------------------------------------------------------
# Pure helpers (tested against hand-worked cases).


def neighbor_similarities(embeddings, labels, k=NUM_NEIGHBORS, chunk_size=1024):
    """Cosine similarity of each row to its k nearest rows of its class and of other classes.

    Args:
      embeddings: [n, D] float rows (normalised here).
      labels: [n] int labels.
      k: neighbours kept per row and group.
      chunk_size: rows per similarity block (memory chunk x n).

    Returns:
      (same [n, k], other [n, k]) float32, each row sorted from most to least
      similar, never the row itself; NaN where a group has fewer than k rows.
    """
    embeddings = np.asarray(embeddings, np.float32)
    embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    n = len(labels)
    same = np.full([n, k], np.nan, np.float32)
    other = np.full([n, k], np.nan, np.float32)
    kept = min(k, n)
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        sims = embeddings[rows] @ embeddings.T  # [c, n]
        is_self = rows[:, None] == np.arange(n)[None, :]
        same_class = labels[rows][:, None] == labels[None, :]
        for out, mask in ((same, same_class & ~is_self), (other, ~same_class)):
            # Descending sort with excluded entries (-inf) last, then -inf -> NaN.
            top = -np.sort(-np.where(mask, sims, -np.inf), axis=1)[:, :kept]
            out[rows, :kept] = np.where(np.isfinite(top), top, np.nan)
    return same, other


def easy_and_hard(members, sims, count):
    """The `count` most and least similar members of each positive set.

    Args:
      members: [A, S] int rows of N(i), padded with -1 (as `propagation.propagate`).
      sims: [A, S] float similarity of each member to its anchor (ignored at padding).
      count: members kept per row.

    Returns:
      (easy [A, count], hard [A, count]) int member ids, -1 padded: `easy` from
      the most similar down, `hard` from the least similar up (the hardest
      positives, members of H(i)). The two overlap when |N(i)| < 2 * count.
    """
    members = np.asarray(members)
    sims = np.asarray(sims, np.float64)
    valid = members >= 0
    out = []
    for key in (np.where(valid, -sims, np.inf), np.where(valid, sims, np.inf)):
        order = np.argsort(key, axis=1, kind="stable")[:, :count]  # padding sorts last
        picked = np.where(
            np.take_along_axis(valid, order, axis=1),
            np.take_along_axis(members, order, axis=1),
            -1,
        )
        if picked.shape[1] < count:  # S < count
            picked = np.pad(picked, [(0, 0), (0, count - picked.shape[1])], constant_values=-1)
        out.append(picked)
    return out[0], out[1]


def read_metrics(workdir):
    """The rows of `workdir/metrics.jsonl` ordered by epoch (the last row of each epoch).

    Raises:
      FileNotFoundError: the run has no metrics.jsonl.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl")
    # A torn last line is dropped with a warning; other bad lines are named with their number.
    rows = {row["epoch"]: row for row in workdir_lib.read_metrics(workdir)}
    return [rows[epoch] for epoch in sorted(rows)]


# ---------------------------------------------------------------------------
# Data access.


@functools.lru_cache(maxsize=4)
def _test_labels(dataset, data_dir):
    """[N] int32 labels of the test split in index order (-1 where unknown).

    Raises:
      ValueError: the test split is missing or has no labels.
    """
    source = data.load_source(dataset, "test", data_dir or None)
    if source is None or not source.num_classes:
        raise ValueError(
            f"the test split of {dataset} has no labels: the similarity figure compares "
            "same-class and other-class neighbours, so it needs a labelled test split"
        )
    labels = data.labels_by_index(source)
    if not np.any(labels >= 0):
        raise ValueError(f"the test split of {dataset} has no labelled images")
    return labels


def _test_embeddings(run, samples_per_class, seed):
    """Fresh embeddings of a class-balanced test sample: (embeddings [m, D], labels [m])."""
    config = run.config
    labels = _test_labels(config.dataset, config.data_dir)
    sample = evaluation.balanced_subset(labels, per_class=samples_per_class, seed=seed)
    source = data.load_source(config.dataset, "test", config.data_dir or None)
    pipeline = input_pipeline.eval_pipeline(
        data.subset_source(source, sample), batch_size=256, image_size=config.image_size
    )
    embeddings, _, sample_labels = evaluation.extract_embeddings(
        evaluation.inference_function(run.encoder), pipeline
    )
    return embeddings, sample_labels


def _train_images(config, indices):
    """{index: (image uint8 [H, W, 3], label)} for `indices` of the train split.

    One pass over the split; only the wanted examples leave tf.data, and the
    pass stops once all were seen, so memory stays at len(indices) images.
    """
    source = data.load_source(
        config.dataset, "train", config.data_dir or None, config.train_examples
    )
    wanted = set(int(i) for i in indices if i >= 0)  # positive sets are -1 padded
    found = {}
    for ex in data.subset_source(source, sorted(wanted)).dataset().as_numpy_iterator():
        found[int(ex["index"])] = (ex["image"], int(ex["label"]))
        if len(found) == len(wanted):
            break
    return found


def graph_was_built(run):
    """Whether the run's checkpointed kNN graph was ever built.

    The graph variable starts as zeros (row 0 then lists itself, which a built graph never
    does); it is built before every epoch of runs with labels, and before the epochs that
    use it otherwise. Read off the graph, not the flags, so that every mode agrees.
    """
    return bool(np.any(run.knn_graph))


def _graph(run):
    """The run's kNN graph, or (if it never built one) the graph of its final bank."""
    if graph_was_built(run):
        return run.knn_graph
    return neighbors.build_knn_graph(run.bank, run.config.num_neighbors, run.config.knn_method)


# ---------------------------------------------------------------------------
# Figures.


def _save(figure, path):
    """Renders `figure` on an Agg canvas (no display) into the PNG `path`."""
    backend_agg.FigureCanvasAgg(figure)
    with tf.io.gfile.GFile(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return path


def _name(run):
    return run.config.workdir or "run"


def similarity_figure(run, output_dir, compare_run=None, samples_per_class=100, seed=0, names=None):
    """Fig. 2a: similarity to the nearest same-class vs other-class test images.

    Args:
      run: a `workdir.Run`.
      output_dir: existing directory for `similarity.png`.
      compare_run: optional second `workdir.Run`, drawn in a second panel with the
        same bins and x axis.
      samples_per_class: test images drawn per class (fixed `seed`).
      seed: seed of the sample.
      names: optional panel names (one per run); default: the runs' workdirs.

    Returns:
      The path of the PNG.

    Raises:
      ValueError: the test split has no labels.
    """
    runs = [run] + ([compare_run] if compare_run is not None else [])
    names = list(names or [_name(r) for r in runs])
    panels = []
    for r in runs:
        embeddings, labels = _test_embeddings(r, samples_per_class, seed)
        same, other = neighbor_similarities(embeddings, labels)
        panels.append((same[np.isfinite(same)], other[np.isfinite(other)], len(labels)))
    values = np.concatenate([np.concatenate([same, other]) for same, other, _ in panels])
    # Shared bins and x axis, so the panels compare at a glance; each panel keeps its own
    # density scale (a collapsed run's spike at 1.0 would flatten the other panel).
    bins = np.linspace(np.floor(values.min() * 10) / 10, 1.0, 51)

    figure = figure_lib.Figure(figsize=(6 * len(runs), 4.2), layout="constrained")
    axes = figure.subplots(1, len(runs), sharex=True, squeeze=False)[0]
    for ax, (same, other, count), name, r in zip(axes, panels, names, runs, strict=True):
        for values_, label, color in (
            (same, "same class", "tab:blue"),
            (other, "other classes", "tab:orange"),
        ):
            ax.hist(
                values_,
                bins=bins,
                alpha=0.55,
                color=color,
                density=True,
                label=f"{label} (mean {values_.mean():.3f})",
            )
            ax.axvline(values_.mean(), color=color, linestyle="--", linewidth=1)
        ax.set_title(f"{name}, epoch {r.epoch}\n{count} test images", fontsize=10)
        ax.set_xlabel(f"cosine similarity to the {NUM_NEIGHBORS} nearest neighbours")
        ax.legend(fontsize=8, loc="best")
        ax.set_ylabel("density")
    return _save(figure, os.path.join(output_dir, "similarity.png"))


def _show(ax, image, title, border=None):
    ax.imshow(image if image.shape[-1] == 3 else image[..., 0], cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7, pad=2)
    for spine in ax.spines.values():
        spine.set_color(border or "lightgray")
        spine.set_linewidth(3 if border else 0.5)


def positives_figure(run, output_dir, num_anchors=6, seed=0, name=None):
    """Fig. 2b: the easiest and hardest propagated positives of a few anchors.

    For `num_anchors` training anchors i (fixed `seed`), N(i) =
    `propagation.propagate(graph, anchors, config.num_layers)` and s_ij =
    bank[i] . bank[j] (the bank stands in for v_i between epochs). Each anchor
    block shows the anchor, a row of the NUM_SHOWN most similar members and a
    row of the NUM_SHOWN least similar ones (hard positives). A red border marks
    a positive whose label differs from the anchor's.

    Args:
      run: a `workdir.Run`; if its graph was never built (instance-only runs, or
        still in the ramp-up) the graph of its final bank is used.
      output_dir: existing directory for `positives.png`.
      num_anchors: anchors shown (>= 1).
      seed: seed of the anchor draw.
      name: run name in the title; default: the run's workdir.

    Returns:
      The path of the PNG.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    config, bank = run.config, run.bank
    rng = np.random.default_rng(seed)
    anchors = np.sort(rng.choice(len(bank), min(num_anchors, len(bank)), replace=False))
    members = propagation.propagate(_graph(run), anchors, config.num_layers).numpy()  # [A, S]
    sims = np.einsum("ad,asd->as", bank[anchors], bank[np.maximum(members, 0)])  # [A, S]
    easy, hard = easy_and_hard(members, sims, NUM_SHOWN)  # [A, NUM_SHOWN] each
    images = _train_images(config, np.concatenate([anchors, easy.ravel(), hard.ravel()]))

    figure = figure_lib.Figure(
        figsize=(1.15 * (NUM_SHOWN + 1), 2.5 * len(anchors)), layout="constrained"
    )
    grid = figure.subplots(2 * len(anchors), NUM_SHOWN + 1, squeeze=False)
    for a, anchor in enumerate(anchors):
        image, anchor_label = images[int(anchor)]
        size = int(np.sum(members[a] >= 0))
        _show(grid[2 * a, 0], image, f"anchor {anchor}\nlabel {anchor_label}", border="black")
        info = grid[2 * a + 1, 0]
        info.axis("off")
        info.text(
            0.5,
            0.5,
            f"|N(i)| = {size}\ntop: easiest\nbottom: hardest",
            ha="center",
            va="center",
            fontsize=7,
            transform=info.transAxes,
        )
        for row, chosen in ((2 * a, easy[a]), (2 * a + 1, hard[a])):
            for col, member in enumerate(chosen, start=1):
                ax = grid[row, col]
                if member < 0:
                    ax.axis("off")
                    continue
                image, label = images[int(member)]
                differs = anchor_label >= 0 and label >= 0 and label != anchor_label
                s = float(bank[anchor] @ bank[member])
                _show(ax, image, f"{s:.3f}", border="red" if differs else None)
    figure.suptitle(
        f"{name or _name(run)}, epoch {run.epoch}: easiest (upper row) and hardest (lower row) "
        f"positives;\ntitles: s_ij = bank_i . bank_j; red border: label differs from the anchor's",
        fontsize=8,
    )
    return _save(figure, os.path.join(output_dir, "positives.png"))


def curves_figure(workdir, output_dir, compare_workdir=None):
    """Training curves of `workdir/metrics.jsonl` (and the compare run, dashed).

    Plots loss_ins and loss_inv, knn_top1 and, when present, purity_neighbors,
    purity_hard, graph_recall and mean_positives; epochs where a metric is
    None or absent are skipped.

    Args:
      workdir: run directory.
      output_dir: existing directory for `curves.png`.
      compare_workdir: optional second run, drawn dashed in the same colours.

    Returns:
      The path of the PNG.

    Raises:
      FileNotFoundError: a run has no metrics.jsonl.
    """
    runs = [(workdir, read_metrics(workdir), "-")]
    if compare_workdir:
        runs.append((compare_workdir, read_metrics(compare_workdir), "--"))

    def series(rows, key):
        # x = epochs completed (epoch + 1), the step TensorBoard uses.
        points = [(row["epoch"] + 1, row[key]) for row in rows if row.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [
        (title, keys)
        for title, keys in CURVE_PANELS
        if any(series(rows, key)[0] for _, rows, _ in runs for key in keys)
    ]
    # Two panels per row, so the figure keeps a page-friendly width.
    cols = min(max(len(panels), 1), 2)
    rows = -(-max(len(panels), 1) // cols)
    figure = figure_lib.Figure(figsize=(5.5 * cols, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for color, key in enumerate(keys):
            for name, rows, style in runs:
                epochs, values = series(rows, key)
                if epochs:
                    ax.plot(
                        epochs,
                        values,
                        style,
                        marker="o",
                        markersize=3,
                        color=f"C{color}",
                        label=f"{key} ({name})" if len(runs) > 1 else key,
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    return _save(figure, os.path.join(output_dir, "curves.png"))


# ---------------------------------------------------------------------------
# The page and the whole analysis.


def write_index(output_dir, figures, title, summary=()):
    """Writes a self-contained `index.html` showing `figures` with captions.

    Args:
      output_dir: directory holding the figures; index.html is written there.
      figures: (png path, caption) pairs; images are linked by file name.
      title: page title.
      summary: lines shown under the title.

    Returns:
      The path of index.html.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}"
        "figcaption{color:#333;margin-top:.5em}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p>{esc(line)}</p>" for line in summary]
    for path, caption in figures:
        name = os.path.basename(path)
        parts.append(
            f'<figure><img src="{esc(name)}" alt="{esc(name)}">'
            f"<figcaption><b>{esc(name)}</b>: {esc(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    path = os.path.join(output_dir, "index.html")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _summary(workdir, run):
    c = run.config
    return (
        f"{workdir}: epoch {run.epoch} of {c.epochs}; encoder {c.encoder} "
        f"(width {c.width_multiplier}, head {c.head}); dataset {c.dataset}; "
        f"temperature {c.temperature}; lambda_inv {c.lambda_inv} after {c.rampup_epochs} "
        f"ramp-up epochs; k {c.num_neighbors}, l {c.num_layers}, P {c.num_positives}."
    )


def _captions(workdir, run, compare, count, num_anchors, samples_per_class, seed):
    """Captions of similarity.png, positives.png and curves.png, in that order."""
    c = run.config
    graph = (
        "the kNN graph the run used in its last epoch"
        if graph_was_built(run)
        else "a kNN graph built here from the final bank (this run never built one)"
    )
    compared = f" Right panel: {compare}, same sampling seed, bins and x axis." if compare else ""
    return (
        f"Paper Fig. 2a. {workdir}, test split of {c.dataset}: a class-balanced sample of "
        f"{count} images (up to {samples_per_class} per class, seed {seed}), embedded by the "
        f"run's encoder. For each image, the cosine similarities to its {NUM_NEIGHBORS} "
        "nearest neighbours of the same class (blue) and of other classes (orange) within "
        "the sample; dashed lines are the means. A good embedding puts blue right of "
        f"orange.{compared}",
        f"Paper Fig. 2b. {workdir}, train split of {c.dataset}: "
        f"{min(num_anchors, len(run.bank))} anchors (seed {seed}). N(i) comes from "
        f"propagating {c.num_layers} hops over {graph}; titles are s_ij = bank_i . bank_j. "
        f"Upper row: the {NUM_SHOWN} most similar members of N(i); lower row: the "
        f"{NUM_SHOWN} least similar, i.e. hard positives in H(i). A red border marks a "
        "positive whose label differs from the anchor's (labels are never used in training).",
        f"Training curves of {workdir}/metrics.jsonl"
        + (f" (solid) and {compare}/metrics.jsonl (dashed)" if compare else "")
        + ": instance and invariance losses (loss_inv starts after the ramp-up), kNN top-1 "
        "on the test split (epochs with evaluation), and, when recorded, the purity of N(i) "
        "and H(i), graph recall and mean |N(i)|.",
    )


def analyze(workdir, output_dir, compare=None, num_anchors=6, samples_per_class=100, seed=0):
    """Writes similarity.png, positives.png, curves.png and index.html for a run.

    Args:
      workdir: training run directory (flags.txt, checkpoints/, metrics.jsonl).
      output_dir: directory to create or reuse (not an existing file).
      compare: optional second run directory, overlaid on similarity and curves.
      num_anchors: anchors of the positives figure (>= 1).
      samples_per_class: test images per class of the similarity figure (>= 2).
      seed: seed of the test sample and of the anchors.

    Returns:
      The written paths: the three PNGs, then index.html.

    Raises:
      ValueError: bad arguments, an output path that is a file, an unlabelled
        test split.
      FileNotFoundError: a workdir without a run.
    """
    if num_anchors < 1:
        raise ValueError(f"--num_anchors must be >= 1, got {num_anchors}")
    if samples_per_class < 2:
        raise ValueError(f"--samples_per_class must be >= 2, got {samples_per_class}")
    if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
        raise ValueError(f"--output={output_dir} is an existing file; give a directory")
    run = workdir_lib.load_run(workdir)
    compare_run = workdir_lib.load_run(compare) if compare else None
    tf.io.gfile.makedirs(output_dir)
    names = [workdir] + ([compare] if compare else [])

    c = run.config
    count = len(
        evaluation.balanced_subset(
            _test_labels(c.dataset, c.data_dir), per_class=samples_per_class, seed=seed
        )
    )
    similarity = similarity_figure(run, output_dir, compare_run, samples_per_class, seed, names)
    positives = positives_figure(run, output_dir, num_anchors, seed, workdir)
    curves = curves_figure(workdir, output_dir, compare)
    captions = _captions(workdir, run, compare, count, num_anchors, samples_per_class, seed)
    figures = list(zip([similarity, positives, curves], captions, strict=True))
    summary = [_summary(workdir, run)]
    if compare_run is not None:
        summary.append("Compared with " + _summary(compare, compare_run))
    index = write_index(output_dir, figures, f"Invariance Propagation analysis: {workdir}", summary)
    return [similarity, positives, curves, index]
