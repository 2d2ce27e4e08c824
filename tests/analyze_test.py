"""The analysis command: pure helpers against hand-worked cases, figures of a tiny real run."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from invp_tf import analysis
from invp_tf import analyze
from invp_tf import training
from invp_tf import workdir as workdir_lib
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained once: 2 epochs, L_inv (and so a kNN graph) from epoch 1."""
    root = tmp_path_factory.mktemp("analyze")
    data_dir = root / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=64, num_test=24, height=12, width=12)
    config = tiny_config(data_dir, root / "run", epochs=2, weight_decay=1e-4)
    training.train_and_evaluate(config, config.workdir)
    return config.workdir


@pytest.fixture(scope="module")
def run(run_dir):
    return workdir_lib.load_run(run_dir)


def _png(path):
    """Decoded RGB(A) pixels of a PNG file, after checking it is a real, non-blank image."""
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        pixels = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, pixels.shape
    assert pixels.reshape(-1, 3).std(axis=0).max() > 5, "a blank image"
    return pixels


def test_neighbor_similarities_hand_worked():
    # Four unit vectors in the plane; a, b are class 0 and c, d class 1.
    #   a.b = 0.8  a.c = 0.6  a.d = 0.0  b.c = 0.96  b.d = 0.6  c.d = 0.8
    points = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    same, other = analysis.neighbor_similarities(3 * points, [0, 0, 1, 1], k=2, chunk_size=3)
    nan = np.nan
    np.testing.assert_allclose(same, [[0.8, nan], [0.8, nan], [0.8, nan], [0.8, nan]], atol=1e-6)
    np.testing.assert_allclose(other, [[0.6, 0.0], [0.96, 0.6], [0.96, 0.6], [0.6, 0.0]], atol=1e-6)


def test_neighbor_similarities_against_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, size=30)
    same, other = analysis.neighbor_similarities(x, labels, k=3, chunk_size=7)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(30):
        sims = x @ x[i]
        mates = [sims[j] for j in range(30) if j != i and labels[j] == labels[i]]
        strangers = [sims[j] for j in range(30) if labels[j] != labels[i]]
        np.testing.assert_allclose(same[i], sorted(mates, reverse=True)[:3], atol=1e-5)
        np.testing.assert_allclose(other[i], sorted(strangers, reverse=True)[:3], atol=1e-5)


def test_easy_and_hard_hand_worked():
    members = np.array([[5, 7, 2, -1, -1], [-1, -1, -1, -1, -1], [4, 1, 0, 3, -1]])
    # Padding similarities are junk on purpose: they must never be picked.
    sims = np.array([[0.1, 0.9, 0.5, 99, -99], [1, 2, 3, 4, 5], [0.3, 0.7, 0.2, 0.4, 99]])
    easy, hard = analysis.easy_and_hard(members, sims, count=2)
    np.testing.assert_array_equal(easy, [[7, 2], [-1, -1], [1, 3]])
    np.testing.assert_array_equal(hard, [[5, 2], [-1, -1], [0, 4]])
    easy, hard = analysis.easy_and_hard(members, sims, count=6)  # wider than S = 5
    np.testing.assert_array_equal(easy[0], [7, 2, 5, -1, -1, -1])
    np.testing.assert_array_equal(hard[2], [0, 4, 3, 1, -1, -1])


def test_read_metrics_keeps_the_last_row_of_each_epoch(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 0, "loss_ins": 3}\n{"epoch": 1, "loss_ins": 9}\n{"epoch": 1, "loss_ins": 2}\n'
    )
    assert [r["loss_ins"] for r in analysis.read_metrics(str(tmp_path))] == [3, 2]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        analysis.read_metrics(str(tmp_path / "absent"))


def test_curves_handle_absent_keys_and_none(tmp_path):
    rows = [
        {"epoch": 0, "loss_ins": 7.0, "loss_inv": None, "knn_top1": None},
        {"epoch": 1, "loss_ins": 6.0, "loss_inv": 3.0, "knn_top1": 0.5, "purity_hard": 0.4},
        {"epoch": 2, "loss_ins": 5.0, "loss_inv": 2.5, "purity_hard": None, "mean_positives": 20},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _png(analysis.curves_figure(str(tmp_path), str(tmp_path), compare_workdir=str(tmp_path)))


def test_each_figure_is_a_png(run, run_dir, tmp_path):
    paths = [
        analysis.similarity_figure(run, str(tmp_path), samples_per_class=100, seed=0),
        analysis.positives_figure(run, str(tmp_path), num_anchors=2, seed=0),
        analysis.curves_figure(run_dir, str(tmp_path)),
    ]
    assert [os.path.basename(p) for p in paths] == ["similarity.png", "positives.png", "curves.png"]
    for path in paths:
        _png(path)
        # tf's decoder agrees it is a PNG.
        assert tf.io.decode_png(tf.io.read_file(path)).shape[-1] in (3, 4)


def test_positives_figure_shows_easiest_and_hardest(run, tmp_path, monkeypatch):
    seen = []

    def spy(members, sims, count):
        easy, hard = original(members, sims, count)
        seen.append((members, sims, easy, hard))
        return easy, hard

    original = analysis.easy_and_hard
    monkeypatch.setattr(analysis, "easy_and_hard", spy)  # where positives_figure looks it up
    analysis.positives_figure(run, str(tmp_path), num_anchors=3, seed=1)
    ((members, sims, easy, hard),) = seen
    assert members.shape[0] == 3 and easy.shape == hard.shape == (3, analysis.NUM_SHOWN)
    for row in range(3):
        valid = members[row] >= 0
        by_member = dict(zip(members[row][valid], sims[row][valid], strict=True))
        easy_sims = [by_member[m] for m in easy[row] if m >= 0]
        hard_sims = [by_member[m] for m in hard[row] if m >= 0]
        assert easy_sims == sorted(easy_sims, reverse=True)
        assert hard_sims == sorted(hard_sims)
        assert easy_sims[0] == max(by_member.values())
        assert hard_sims[0] == min(by_member.values())
        # s_ij is bank_i . bank_j of the members of the run's propagated set.
        assert set(by_member) <= set(range(len(run.bank)))


def test_analyze_end_to_end_with_compare(run_dir, tmp_path):
    output = tmp_path / "out"
    paths = analysis.analyze(run_dir, str(output), compare=run_dir, num_anchors=2)
    assert [os.path.basename(p) for p in paths] == [
        "similarity.png",
        "positives.png",
        "curves.png",
        "index.html",
    ]
    page = (output / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == ["curves.png", "positives.png", "similarity.png"]
    for src in sources:
        assert not os.path.isabs(src)
        assert (output / src).stat().st_size > 0
    assert run_dir in page and "epoch 2 of 2" in page and "resnet18_cifar" in page
    assert page.count("<figcaption>") == 3
    # Two panels side by side: twice as wide as a single-run figure.
    wide = _png(paths[0])
    single = _png(analysis.similarity_figure(workdir_lib.load_run(run_dir), str(tmp_path)))
    assert wide.shape[1] > 1.5 * single.shape[1]


def test_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run"):
        analysis.analyze(str(tmp_path), str(tmp_path / "out"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        analysis.analyze(run_dir, str(a_file))
    with pytest.raises(ValueError, match="--num_anchors must be >= 1"):
        analysis.analyze(run_dir, str(tmp_path / "out"), num_anchors=0)


def test_unlabelled_test_split_is_refused(run, tmp_path):
    # A folder dataset whose test/ images sit at the top level: no labels.
    for split in ("train", "test"):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(3):
            png = tf.io.encode_png(np.full((12, 12, 3), 40 * i, np.uint8)).numpy()
            (tmp_path / "images" / split / f"{i}.png").write_bytes(png)
    unlabelled = dataclasses.replace(
        run, config=dataclasses.replace(run.config, dataset=f"folder:{tmp_path / 'images'}")
    )
    with pytest.raises(ValueError, match="has no labels"):
        analysis.similarity_figure(unlabelled, str(tmp_path))


def test_cli_error_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        analyze.main(["invp-analyze", f"--workdir={tmp_path}", f"--output={tmp_path}/out"])
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("invp_tf.analyze: error: ")
    assert "not a training run" in stderr and "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs chromium")
def test_index_renders_in_a_browser(run_dir, tmp_path):
    output = tmp_path / "out"
    analysis.analyze(run_dir, str(output), num_anchors=2)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            shutil.which("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            f"file://{output / 'index.html'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = _png(shot)
    # The figures fill much of the page: many distinct colours, not a blank page.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_positives_of_a_knn_positives_run_come_from_a_real_graph(run_dir, tmp_path):
    # --positive_mode=knn: the loss never reads the graph; the figure must not draw
    # positives from the graph variable's initial zeros.
    config = workdir_lib.load_run(run_dir).config
    config = dataclasses.replace(config, workdir=str(tmp_path / "knn"), positive_mode="knn")
    training.train_and_evaluate(config, config.workdir)
    run = workdir_lib.load_run(config.workdir)
    graph = analysis._graph(run)
    assert analysis.graph_was_built(run)
    assert not np.any(graph == np.arange(len(graph))[:, None])  # zeros: row 0 lists itself
    unbuilt = dataclasses.replace(run, knn_graph=np.zeros_like(run.knn_graph))
    assert not analysis.graph_was_built(unbuilt)
    rebuilt = analysis._graph(unbuilt)  # falls back to the final bank's graph
    assert not np.any(rebuilt == np.arange(len(rebuilt))[:, None])
