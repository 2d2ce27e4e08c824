"""Batch embedding with an export: files equal the served signatures, ids line up, bad input."""

import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from invp_tf import augment
from invp_tf import embed
from invp_tf import embeddings
from invp_tf import saved_model
from invp_tf import training
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 12  # tiny_config's image_size
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(export version folder, IDX folder, test-split arrays) of a tiny trained run."""
    root = tmp_path_factory.mktemp("embed")
    data_dir = root / "idx"
    data_dir.mkdir()
    arrays = write_idx_dataset(data_dir, num_train=64, num_test=24, height=SIZE, width=SIZE)
    config = tiny_config(data_dir, root / "run", epochs=1)
    training.train_and_evaluate(config, config.workdir)
    return (
        saved_model.export_run(config.workdir, str(root / "models"), "invp"),
        data_dir,
        arrays["t10k"],
    )


@pytest.fixture(scope="module")
def signatures(model):
    return tf.saved_model.load(model[0]).signatures


def _served(signatures, grey_images):
    """serving_default on the eval view of [N, H, W] grey uint8 images (IDX tiled to RGB)."""
    views = [augment.eval_view(np.repeat(x[:, :, None], 3, axis=2), SIZE) for x in grey_images]
    return signatures["serving_default"](images=tf.stack(views))


def _read_tsv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "id\tlabel"
    return [line.split("\t") for line in lines[1:]]


def test_dataset_to_npy_equals_serving_default(model, signatures, tmp_path):
    path, data_dir, (images, labels) = model
    output = tmp_path / "test.npy"
    summary = embeddings.embed(
        path,
        str(output),
        dataset="fashion_mnist",
        split="test",
        data_dir=str(data_dir),
        batch_size=10,  # 24 images: two full batches and a partial one
        verbose=False,
    )
    assert summary["num_images"] == 24 and summary["dim"] == 16
    vectors = np.load(output)
    assert vectors.shape == (24, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(
        vectors, _served(signatures, images)["embedding"].numpy(), rtol=1e-5, atol=1e-6
    )
    rows = _read_tsv(tmp_path / "test.ids.tsv")
    assert [r[0] for r in rows] == [str(i) for i in range(24)]
    assert [int(r[1]) for r in rows] == labels.tolist()
    assert sorted(os.listdir(tmp_path)) == ["test.ids.tsv", "test.npy"]  # no staging left

    features = embeddings.embed(
        path,
        str(tmp_path / "features.npy"),
        dataset="fashion_mnist",
        split="test",
        data_dir=str(data_dir),
        output_key="features",
        verbose=False,
    )
    assert features["dim"] == 32
    np.testing.assert_allclose(
        np.load(tmp_path / "features.npy"),
        _served(signatures, images)["features"].numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def _write_image(path, pixels, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def test_folder_to_tfrecord_equals_serving_bytes(model, signatures, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    files = {
        "b.png": (rng.integers(0, 256, (20, 20), dtype=np.uint8), "PNG"),  # grey
        "a/x.jpg": (rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "JPEG"),
        "a/y.PNG": (rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "PNG"),  # RGBA
        "c/d/z.bmp": (rng.integers(0, 256, (16, 10, 3), dtype=np.uint8), "BMP"),
    }
    for name, (pixels, fmt) in files.items():
        _write_image(str(folder / name), pixels, fmt)
    (folder / "notes.txt").write_text("not an image, skipped")
    output = tmp_path / "photos.tfrecord"
    summary = embeddings.embed(
        model[0], str(output), images=str(folder), batch_size=3, verbose=False
    )
    assert summary["num_images"] == 4 and summary["index"] is None

    spec = {
        "id": tf.io.FixedLenFeature([], tf.string),
        "index": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "embedding": tf.io.FixedLenFeature([16], tf.float32),
    }
    records = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(output))]
    ids = [r["id"].numpy().decode() for r in records]
    assert ids == sorted(files)  # sorted relative paths
    assert [int(r["index"]) for r in records] == [0, 1, 2, 3]
    assert all(int(r["label"]) == -1 for r in records)
    assert [r[0] for r in _read_tsv(tmp_path / "photos.ids.tsv")] == ids
    encoded = [(folder / name).read_bytes() for name in ids]
    want = signatures["serving_bytes"](image_bytes=tf.constant(encoded))["embedding"].numpy()
    got = np.stack([r["embedding"].numpy() for r in records])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_knn_index_finds_each_row_itself(model, tmp_path):
    scann = pytest.importorskip("scann")
    path, data_dir, _ = model
    output = tmp_path / "train.npy"
    summary = embeddings.embed(
        path,
        str(output),
        dataset="fashion_mnist",
        split="train",
        data_dir=str(data_dir),
        with_knn_index=True,
        index_neighbors=5,
        verbose=False,
    )
    assert summary["index"] == str(tmp_path / "train.scann")
    vectors = np.load(output)
    searcher = scann.scann_ops_pybind.load_searcher(summary["index"])
    found, _ = searcher.search_batched(vectors)
    assert found.shape == (64, 5)
    exact = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")[:, :5]
    sims = np.take_along_axis(vectors @ vectors.T, found.astype(np.int64), axis=1)
    np.testing.assert_allclose(
        sims, np.take_along_axis(vectors @ vectors.T, exact, axis=1), atol=1e-5
    )


def test_unreadable_image_is_named_and_nothing_is_written(model, tmp_path):
    folder = tmp_path / "photos"
    _write_image(str(folder / "good.png"), np.zeros((8, 8, 3), np.uint8), "PNG")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    (folder / "broken.png").write_bytes(buffer.getvalue()[:40])  # PNG signature, truncated
    with pytest.raises(embeddings.EmbedError, match=f"unreadable image: {folder / 'broken.png'}"):
        embeddings.embed(model[0], str(tmp_path / "out.npy"), images=str(folder), verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_an_image_above_the_pixel_limit_is_refused_undecoded(model, tmp_path):
    # The folder datasets' limit (image_headers.read_file): a PNG header announcing
    # 8000 x 7000 (56 megapixels) is refused from its header; its pixels are never decoded.
    folder = tmp_path / "photos"
    _write_image(str(folder / "good.png"), np.zeros((8, 8, 3), np.uint8), "PNG")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 8000, 7000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    line = (
        f"{folder / 'huge.png'} decodes to 1 frame(s) of 8000x7000 (width x height) = "
        "56000000 pixels, above the limit of 50000000 for folder datasets"
    )
    with pytest.raises(embeddings.EmbedError, match=re.escape(line)):
        embeddings.embed(model[0], str(tmp_path / "out.npy"), images=str(folder), verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_bad_arguments(model, tmp_path):
    path = model[0]
    out = str(tmp_path / "out.npy")
    with pytest.raises(ValueError, match="exactly one of --images and --dataset"):
        embeddings.embed(path, out)
    with pytest.raises(ValueError, match="unknown dataset 'nonsense'"):
        embeddings.embed(path, out, dataset="nonsense")
    with pytest.raises(ValueError, match=r"must end with \.npy or \.tfrecord"):
        embeddings.embed(path, str(tmp_path / "out.csv"), dataset="fashion_mnist")
    with pytest.raises(FileNotFoundError, match="not a SavedModel"):
        embeddings.embed(str(tmp_path), out, dataset="fashion_mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        embeddings.embed(path, out, images=str(tmp_path / "empty"))


def test_cli_error_is_one_clear_line(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        embed.main(["invp-embed", f"--model={model[0]}", f"--images={tmp_path / 'absent'}",
                    f"--output={tmp_path / 'out.npy'}"])  # fmt: skip
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    last_line = stderr.strip().splitlines()[-1]
    assert (
        last_line == f"invp_tf.embed: error: --images folder {tmp_path / 'absent'} does not exist"
    )
    assert "Traceback" not in stderr


def _read_idx_images(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz")),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_cli_embeds_10k_fashion_mnist_like_serving_default(model, signatures, tmp_path):
    """The acceptance run: the CLI over the 10,000 Fashion-MNIST test images, with the index."""
    output = tmp_path / "fmnist_test.npy"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "invp_tf.embed", f"--model={model[0]}",
         "--dataset=fashion_mnist", "--split=test", f"--output={output}", "--with_knn_index"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"embed CLI: {wall:.1f} s wall for 10,000 images; {summary}")
    vectors = np.load(output, mmap_mode="r")
    assert vectors.shape == (10_000, 16)
    rows = _read_tsv(tmp_path / "fmnist_test.ids.tsv")
    assert [r[0] for r in rows] == [str(i) for i in range(10_000)]
    images = _read_idx_images(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))
    sample = np.sort(np.random.default_rng(0).choice(10_000, 64, replace=False))
    want = _served(signatures, images[sample])["embedding"].numpy()
    np.testing.assert_allclose(vectors[sample], want, rtol=1e-5, atol=1e-6)
    assert os.path.isdir(tmp_path / "fmnist_test.scann")
