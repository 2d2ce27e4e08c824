"""The native kernels: their build and cache; InvpTopMask's set against tf.math.top_k,
InvpListAbove's lists against NumPy, InvpListedTop's set against top_k over the lists; the
views' InvpResizeAntialiased and InvpGaussianBlur against the TensorFlow ops they replace."""

import hashlib
import logging
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import augment
from invp_tf import kernels
from invp_tf import topm


@pytest.fixture(name="native")
def fixture_native():
    ops = kernels.native_ops()
    assert ops is not None, "the native TopM kernels did not build (see the warning)"
    return ops


@pytest.fixture(name="op")
def fixture_op(native):
    return native.invp_top_mask


@pytest.fixture(name="fresh")
def fixture_fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded op; restored afterwards."""
    monkeypatch.setenv("INVP_TF_CACHE", str(tmp_path / "cache"))
    kernels.native_ops.cache_clear()
    yield tmp_path / "cache"
    kernels.native_ops.cache_clear()


def _top_k_mask(logits, k, excluded):
    _, top = tf.math.top_k(logits, k=k)
    mask = np.zeros(logits.shape, bool)
    np.put_along_axis(mask, top.numpy(), True, axis=1)
    for row, column in enumerate(excluded):
        if 0 <= column < logits.shape[1]:
            mask[row, column] = False
    return mask


def test_build_writes_one_library_and_reuses_it(fresh, monkeypatch):
    path = kernels.build()
    assert path.parent == fresh and path.exists()
    # The library and its SHA-256, no partial file left; nothing another user may write.
    assert sorted(p.name for p in fresh.iterdir()) == [path.name, path.name + ".sha256"]
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(kernels.hash_path(path).stat().st_mode) == 0o600
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert kernels.hash_path(path).read_text() == digest + "\n"

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert kernels.build() == path
    assert kernels.native_ops() is not None  # loads the cached library


def test_a_changed_source_gets_its_own_library(fresh, tmp_path, monkeypatch):
    source = tmp_path / "top_mask.cc"
    source.write_bytes(kernels.SOURCES[0].read_bytes() + b"\n// changed\n")
    before = kernels.library_path()
    monkeypatch.setattr(kernels, "SOURCES", (source, *kernels.SOURCES[1:]))
    assert kernels.library_path() != before


def test_a_failed_build_names_the_compiler_and_falls_back(fresh, tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    broken = tmp_path / "top_mask.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCES", (broken, *kernels.SOURCES[1:]))
    with pytest.raises(RuntimeError, match=r"c\+\+ failed to build top_mask.cc \+ views.cc"):
        kernels.build()
    assert not list(fresh.iterdir())  # nothing half written is left to load
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C.. compiler 'no-such-compiler'"):
        kernels.build()
    assert kernels.native_ops() is None  # a warning, not an error
    # ... and the exact search still gives the top_k set, as TensorFlow ops.
    logits = np.random.default_rng(0).standard_normal((4, 500)).astype(np.float32)
    excluded = np.array([0, 1, 2, 3], np.int32)
    got = topm._exact_top_mask(tf.constant(logits), 50, excluded).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, 50, excluded))


# A library that is not the kernels: loading it runs its constructor, which writes a file.
_PLANTED = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
  const char* marker = std::getenv("INVP_TF_TEST_MARKER");
  if (marker == nullptr) return;
  std::FILE* f = std::fopen(marker, "w");
  if (f != nullptr) { std::fputs("loaded\n", f); std::fclose(f); }
}
"""


@pytest.fixture(name="libraries", scope="module")
def fixture_libraries(tmp_path_factory):
    """(planted, benign): two tiny shared libraries, the first writes $INVP_TF_TEST_MARKER
    when loaded; the second stands in for the kernels' build."""
    folder = tmp_path_factory.mktemp("libraries")
    paths = []
    for name, source in [("planted", _PLANTED), ("benign", "int benign() { return 0; }\n")]:
        (folder / f"{name}.cc").write_text(source)
        subprocess.run(
            ["c++", "-shared", "-fPIC", str(folder / f"{name}.cc"), "-o", str(folder / name)],
            check=True,
        )
        paths.append(folder / name)
    return tuple(paths)


@pytest.fixture(name="loading")
def fixture_loading(libraries, tmp_path, monkeypatch):
    """A process that has loaded no kernels, whose builds copy the benign library; yields the
    marker file that the planted library's constructor writes."""
    _, benign = libraries
    monkeypatch.setattr(kernels, "_LOADED", [])
    marker = tmp_path / "planted-library-ran"
    monkeypatch.setenv("INVP_TF_TEST_MARKER", str(marker))

    def compile_benign(command, **kwargs):
        shutil.copy(benign, command[command.index("-o") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(kernels.subprocess, "run", compile_benign)
    return marker


def _recorded(path):
    return path.with_name(path.name + ".sha256")  # kernels.hash_path


def _plant(path, planted, record=True):
    path.parent.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(planted, path)
    if record:  # a hash that matches the planted file
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        _recorded(path).write_text(digest + "\n")


@pytest.mark.parametrize("record", ["none", "another library's"])
def test_a_library_that_is_not_the_one_built_is_not_loaded(
    fresh, libraries, loading, caplog, record
):
    planted, benign = libraries
    path = kernels.library_path()
    _plant(path, planted, record=False)
    if record != "none":
        _recorded(path).write_text(hashlib.sha256(b"other").hexdigest() + "\n")
    with caplog.at_level(logging.WARNING):
        kernels.native_ops()  # the benign build has no ops: None, with a warning
    assert not loading.exists(), "the planted library was loaded"
    problem = {
        "none": "no SHA-256 was recorded for it when it was built",
        "another library's": "its SHA-256 differs from the one recorded when it was built",
    }[record]
    assert f"Not loading {path}: {problem}; rebuilding it." in caplog.text
    assert path.read_bytes() == benign.read_bytes()  # rebuilt, and its hash recorded
    assert _recorded(path).read_text().split() == [hashlib.sha256(benign.read_bytes()).hexdigest()]


@pytest.mark.parametrize("shared", ["group-writable", "world-writable", "another user's"])
def test_a_cache_folder_others_can_write_is_not_used(
    fresh, libraries, loading, tmp_path, monkeypatch, caplog, shared
):
    planted, _ = libraries
    name = kernels.library_path().name
    folder = tmp_path / "shared"
    folder.mkdir()
    if shared == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(folder, 65534, 65534)
        problem = f"it is owned by uid 65534, not by this user (uid {os.geteuid()})"
    else:
        mode = 0o775 if shared == "group-writable" else 0o777
        os.chmod(folder, mode)
        problem = f"it is writable by its group or others (mode {mode:o})"
    _plant(folder / name, planted)  # with a matching hash: whoever can write there can
    monkeypatch.setenv("INVP_TF_CACHE", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    private = tmp_path / "home" / ".cache" / "invp_tf"
    with caplog.at_level(logging.WARNING):
        kernels.native_ops()
    assert not loading.exists(), "the planted library was loaded"
    assert (
        f"Not using the kernel cache {folder}: {problem}; using the private folder {private} "
        "instead (see INVP_TF_CACHE in README.md)."
    ) in caplog.text
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert sorted(p.name for p in private.iterdir()) == [name, name + ".sha256"]


def test_the_kernel_can_be_turned_off(fresh, monkeypatch):
    monkeypatch.setenv("INVP_TF_NATIVE", "0")
    assert kernels.native_ops() is None
    assert not os.path.exists(fresh)  # nor built


@pytest.mark.parametrize(
    "b, n, k", [(64, 20000, 2048), (8, 6000, 1), (8, 6000, 5999), (3, 7, 3), (5, 100, 40)]
)
def test_the_set_is_top_k_s(op, b, n, k):
    rng = np.random.default_rng(n + k)
    logits = rng.standard_normal((b, n)).astype(np.float32)
    excluded = rng.integers(0, n, b).astype(np.int32)
    got = op(tf.constant(logits), excluded, k=k).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, k, excluded))


def test_ties_go_to_the_lower_column(op):
    # A dozen distinct values: hundreds tie at the k-th in every row.
    rng = np.random.default_rng(1)
    logits = (np.round(rng.standard_normal((16, 3000)) * 2) / 2).astype(np.float32)
    excluded = np.full(16, -1, np.int32)  # out of range: nothing excluded
    got = op(tf.constant(logits), excluded, k=510).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, 510, excluded))
    assert list(got.sum(axis=1)) == [510] * 16


def test_a_misleading_sample_costs_time_not_the_set(op):
    # Every sampled column (every 2nd of 6000) holds a low value and the rest high
    # ones: the bracket from the sample misses, and the row is selected over all of it.
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 6000)).astype(np.float32) + 10
    logits[:, ::2] -= 20
    excluded = np.zeros(4, np.int32)
    got = op(tf.constant(logits), excluded, k=500).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, 500, excluded))


def test_nan_ranks_below_every_number(op):
    logits = np.array([[np.nan, 1.0, np.nan, 2.0, -np.inf, 0.0]], np.float32)
    excluded = np.array([-1], np.int32)
    got = [op(tf.constant(logits), excluded, k=k).numpy()[0] for k in (3, 4, 5)]
    np.testing.assert_array_equal(got[0], [False, True, False, True, False, True])
    np.testing.assert_array_equal(got[1], [False, True, False, True, True, True])  # -inf
    np.testing.assert_array_equal(got[2], [True, True, False, True, True, True])  # 1st NaN
    # The same where a misleading sample sends the row to the whole-row selection:
    # NaN in every sampled (even) column of 6000, numbers elsewhere.
    row = np.arange(6000, dtype=np.float32)
    row[::2] = np.nan
    got = op(tf.constant(row[None]), excluded, k=3001).numpy()[0]
    np.testing.assert_array_equal(np.flatnonzero(got), np.r_[0, np.arange(1, 6000, 2)])


def test_k_at_least_n_keeps_every_column_but_the_excluded(op):
    logits = np.zeros((2, 5), np.float32)
    got = op(tf.constant(logits), np.array([1, 7], np.int32), k=5).numpy()
    np.testing.assert_array_equal(got, [[True, False, True, True, True], [True] * 5])


def test_infinities_and_empty_inputs(op):
    logits = np.array([[np.inf, 1.0, np.inf, -np.inf, 0.0, np.inf]], np.float32)
    got = op(tf.constant(logits), np.array([2], np.int32), k=4).numpy()
    np.testing.assert_array_equal(got, _top_k_mask(logits, 4, [2]))
    assert op(tf.zeros([0, 5]), tf.zeros([0], tf.int32), k=2).shape == (0, 5)
    assert op(tf.zeros([3, 0]), tf.zeros([3], tf.int32), k=2).shape == (3, 0)


def test_bad_shapes_are_named(op):
    with pytest.raises(tf.errors.InvalidArgumentError, match="logits must be"):
        op(tf.zeros([2, 3, 4]), tf.zeros([2], tf.int32), k=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="excluded must be"):
        op(tf.zeros([2, 3]), tf.zeros([3], tf.int32), k=1)


def _listing_oracle(logits, threshold, base, offset):
    """InvpListAbove's outputs by NumPy: row-major entries above each row's threshold."""
    rows, columns = np.nonzero(logits > threshold[:, None])  # row-major, NaN never listed
    in_row = np.bincount(rows, minlength=len(logits)).astype(np.int32)
    first = np.cumsum(in_row) - in_row
    positions = np.arange(len(rows)) - first[rows] + base[rows]
    return rows, columns + offset, logits[rows, columns], positions, base + in_row


def test_list_above_lists_row_major_with_positions(native):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 500)).astype(np.float32)
    logits[1, ::7] = np.nan
    threshold = np.array([1.5, 1.0, np.inf, -np.inf, 2.0, 0.5], np.float32)
    threshold[4] = logits[4].max()  # strictly above: nothing listed in row 4
    base = np.array([0, 3, 9, 0, 2, 1], np.int32)
    got = native.invp_list_above(logits, threshold, base, 1000)
    want = _listing_oracle(logits, threshold, base, 1000)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
    assert got[0].dtype == tf.int32 and got[2].dtype == tf.float32
    assert got[4].numpy()[3] == 500 - 0  # -inf lists every number of row 3
    empty = native.invp_list_above(tf.zeros([0, 4]), tf.zeros([0]), tf.zeros([0], tf.int32), 0)
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0, 0]


def test_list_above_bad_shapes_are_named(native):
    with pytest.raises(tf.errors.InvalidArgumentError, match="threshold and base must be"):
        native.invp_list_above(tf.zeros([2, 3]), tf.zeros([3]), tf.zeros([2], tf.int32), 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="logits must be"):
        native.invp_list_above(tf.zeros([3]), tf.zeros([3]), tf.zeros([3], tf.int32), 0)


def _chunked_listing(native, logits, threshold, chunk):
    """The flat lists of `logits` listed `chunk` columns at a time (chunk-major)."""
    parts, count = [], tf.zeros([len(logits)], tf.int32)
    for start in range(0, logits.shape[1], chunk):
        *lists, count = native.invp_list_above(
            logits[:, start : start + chunk], threshold, count, start
        )
        parts.append(lists)
    row, column, value, position = (tf.concat(p, 0).numpy() for p in zip(*parts, strict=True))
    return row, column, value, position, count.numpy()


@pytest.mark.parametrize("quantised", [False, True])
def test_listed_top_is_top_k_over_each_rows_listing(native, quantised):
    # Chunk-major flat lists, as the chunked exact search holds them; a row's top k
    # among its listed entries must be top_k's over the row (ties: lower column),
    # less the excluded column, returned row-major.
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((12, 3000)).astype(np.float32)
    if quantised:  # a dozen values: hundreds tie at the k-th, across chunks
        logits = np.round(logits * 2) / 2
    k = 300
    threshold = np.sort(logits, axis=1)[:, -450].astype(np.float32) - 1e-3  # ~450 listed
    threshold[0] = np.sort(logits[0])[-200]  # fewer than k listed: all of them kept
    row, column, value, position, count = _chunked_listing(native, logits, threshold, 700)
    listed = np.full(logits.shape, -np.inf, np.float32)
    listed[row, column] = value
    top = _top_k_mask(listed, k, [-1] * 12)
    excluded = np.argmax(np.where(top, rng.random(logits.shape), -1), axis=1).astype(np.int32)
    excluded[3] = -1  # nothing excluded
    excluded[4] = np.flatnonzero(~top[4])[0]  # a column outside TopM: nothing dropped
    got_row, got_column, got_value = (
        t.numpy()
        for t in native.invp_listed_top(value, row, column, position, count, excluded, k=k)
    )
    want = top.copy()
    want[0] = logits[0] > threshold[0]
    for b, c in enumerate(excluded):
        if c >= 0:
            want[b, c] = False
    want_row, want_column = np.nonzero(want)  # row-major
    np.testing.assert_array_equal(got_row, want_row)
    np.testing.assert_array_equal(got_column, want_column)
    np.testing.assert_array_equal(got_value, logits[want_row, want_column])
    assert np.bincount(got_row, minlength=12)[[3, 4]].tolist() == [k, k]
    # The positions, not the flat order, give each row's order: shuffled lists, same result.
    shuffle = rng.permutation(len(row))
    shuffled = native.invp_listed_top(
        *(x[shuffle] for x in (value, row, column, position)), count, excluded, k=k
    )
    for got, want in zip(shuffled, (got_row, got_column, got_value), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


def test_listed_top_bad_lists_are_named(native):
    value, row, column = tf.zeros([4]), tf.constant([0, 0, 1, 1]), tf.constant([0, 1, 0, 1])
    position, count, excluded = (
        tf.constant([0, 1, 0, 1]),
        tf.constant([2, 2]),
        tf.constant([-1, -1]),
    )

    def call(**change):
        args = dict(value=value, row=row, column=column, position=position, count=count)
        args.update(change)
        return native.invp_listed_top(**args, excluded=excluded, k=1)

    with pytest.raises(tf.errors.InvalidArgumentError, match="count sums to 3, not C = 4"):
        call(count=tf.constant([2, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="row or position is out of range"):
        call(row=tf.constant([0, 0, 1, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="row or position is out of range"):
        call(position=tf.constant([0, 2, 0, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="two entries at one position"):
        call(position=tf.constant([0, 0, 0, 1]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="value, row, column and position must be"
    ):
        call(row=row[:3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="count and excluded must be"):
        native.invp_listed_top(value, row, column, position, count, excluded[:1], k=1)


def test_listed_top_of_empty_lists(native):
    empty_i, empty_f = tf.zeros([0], tf.int32), tf.zeros([0])
    kept = native.invp_listed_top(
        empty_f, empty_i, empty_i, empty_i, tf.zeros([3], tf.int32), tf.fill([3], -1), k=2
    )
    assert [t.shape[0] for t in kept] == [0, 0, 0]
    kept = native.invp_listed_top(empty_f, empty_i, empty_i, empty_i, empty_i, empty_i, k=2)
    assert [t.shape[0] for t in kept] == [0, 0, 0]


def test_list_above_base_out_of_range_is_named(native):
    with pytest.raises(tf.errors.InvalidArgumentError, match="base out of range"):
        native.invp_list_above(tf.zeros([1, 3]), tf.zeros([1]), tf.constant([-1]), 0)


def test_native_and_tensorflow_op_listings_are_equal(native, monkeypatch):
    # topm._list_entries: the same flat lists (order included) by either path.
    rng = np.random.default_rng(7)
    bank = rng.standard_normal((2500, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    embeddings = tf.math.l2_normalize(rng.standard_normal((5, 8)).astype(np.float32), axis=1)
    threshold = tf.constant([2.0, -np.inf, 9.0, 5.0, 0.0], tf.float32)  # / tau 0.2: up to 5
    monkeypatch.setattr(topm, "CHUNK_ROWS", 700)
    assert topm._native_ops() is not None
    got = topm._list_entries(embeddings, tf.constant(bank), threshold, 0.2)
    monkeypatch.setattr(topm, "_native_ops", lambda: None)
    want = topm._list_entries(embeddings, tf.constant(bank), threshold, 0.2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w.numpy())
    assert got[4].numpy()[1] == 2500 and got[4].numpy()[2] == 0


@pytest.mark.parametrize(
    "shape, size",
    [
        ((375, 500, 3), (224, 224)),  # downsampling both sides, as ImageNet crops
        ((100, 300, 3), (224, 224)),  # upsampling one side, downsampling the other
        ((20, 30, 3), (224, 224)),  # upsampling both
        ((57, 41, 1), (28, 28)),  # grey, odd scales
        ((1, 1, 3), (5, 7)),
        ((224, 224, 3), (224, 224)),  # the identity
        ((9, 700, 4), (3, 100)),
    ],
)
def test_resize_antialiased_is_tf_image_resize(native, shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = tf.image.resize(
        tf.image.convert_image_dtype(image, tf.float32), size, "bilinear", antialias=True
    )
    got = native.invp_resize_antialiased(image, size)
    assert got.dtype == tf.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_resize_antialiased_constant_and_extreme_images(native):
    for value in (0, 255, 77):
        image = np.full((301, 203, 3), value, np.uint8)
        got = native.invp_resize_antialiased(image, [224, 224]).numpy()
        np.testing.assert_allclose(got, value / 255, rtol=0, atol=1e-6)


def test_resize_antialiased_bad_inputs_are_named(native):
    with pytest.raises(tf.errors.InvalidArgumentError, match="image must be"):
        native.invp_resize_antialiased(tf.zeros([2, 4, 4, 3], tf.uint8), [2, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="size must be positive"):
        native.invp_resize_antialiased(tf.zeros([4, 4, 3], tf.uint8), [0, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="image must not be empty"):
        native.invp_resize_antialiased(tf.zeros([0, 4, 3], tf.uint8), [2, 2])


@pytest.mark.parametrize(
    "n, h, w, c", [(4, 224, 224, 3), (3, 56, 40, 3), (2, 21, 20, 1), (0, 30, 30, 3)]
)
def test_gaussian_blur_is_the_recipes_blur(native, n, h, w, c):
    # augment.gaussian_blur (TensorFlow ops) with sigma fixed to each image's own.
    rng = np.random.default_rng(n + h)
    images = rng.random((n, h, w, c), dtype=np.float32)
    sigma = rng.uniform(0.1, 2.0, n).astype(np.float32)
    radius = min(h, w) // 20
    got = native.invp_gaussian_blur(images, sigma, [True] * n, radius).numpy()
    assert got.shape == images.shape
    for image, s, out in zip(images, sigma, got, strict=True):
        if c == 1:  # the recipe's blur is RGB: blur the grey channel tiled
            image = np.repeat(image, 3, axis=-1)
        want = augment.gaussian_blur(tf.constant(image), tf.constant([0, 0]), sigma=(s, s))
        np.testing.assert_allclose(out, want.numpy()[..., :c], rtol=0, atol=1e-6)


def test_gaussian_blur_keeps_constants_and_names_bad_inputs(native):
    images = np.full((2, 40, 40, 3), 0.3, np.float32)
    on = [True, True]
    got = native.invp_gaussian_blur(images, [0.5, 2.0], on, 2).numpy()
    np.testing.assert_allclose(got, 0.3, rtol=0, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sigma must be \[2\]"):
        native.invp_gaussian_blur(images, [0.5], on, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="radius 40 must be in"):
        native.invp_gaussian_blur(images, [0.5, 1.0], on, 40)
    with pytest.raises(tf.errors.InvalidArgumentError, match="images must be"):
        native.invp_gaussian_blur(images[0], [0.5], [True], 2)
