"""torch_checkpoint: the authors' checkpoints read and written without torch, refusals."""

import collections
import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest

from invp_tf import torch_checkpoint as tc

DATA = pathlib.Path(__file__).parent / "data" / "authors_checkpoints"
CASES = {case["file"]: case for case in json.loads((DATA / "cases.json").read_text())}


@pytest.mark.parametrize(
    "name, file_format, head_keys",
    [
        ("resnet50_w0125_linear", "zip", ["module.fc.weight", "module.fc.bias"]),
        ("resnet50_w0125_mlp", "legacy", ["module.fc.0.weight", "module.fc.2.weight"]),
    ],
)
def test_reads_the_authors_checkpoints_in_both_formats(name, file_format, head_keys, monkeypatch):
    monkeypatch.setattr(tc, "MAPPED_BYTES", 16 * 1024)  # the bank (32 KB) mapped, BN vectors read
    obj, read_format = tc.load(DATA / f"{name}.pth")
    expected = np.load(DATA / f"{name}_expected.npz")
    assert read_format == file_format
    assert sorted(obj) == ["epoch", "memory_banks", "neigh", "optimizer", "state_dict"]
    assert obj["epoch"] == 7
    state = obj["state_dict"]
    assert isinstance(state, collections.OrderedDict)
    assert all(key in state for key in head_keys)
    np.testing.assert_array_equal(obj["memory_banks"], expected["memory_banks"])
    np.testing.assert_array_equal(obj["neigh"], expected["neigh"])
    assert obj["neigh"].dtype == np.int64 and obj["memory_banks"].dtype == np.float32
    assert state["module.bn1.num_batches_tracked"].shape == ()
    assert int(state["module.bn1.num_batches_tracked"]) == 123
    assert state["module.conv1.weight"].shape == (64, 3, 7, 7)
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    running = sum(v.size for k, v in state.items() if "running_" in k)
    assert params - running == CASES[f"{name}.pth"]["params"]
    # Memory-mapped views of the file, not copies.
    bank = obj["memory_banks"]
    assert not bank.flags.writeable
    base = bank
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    small = state["module.bn1.weight"]
    assert not small.flags.writeable and not isinstance(small.base, np.memmap)


@pytest.mark.parametrize("file_format", tc.FORMATS)
def test_writer_round_trips_dtypes_strides_and_containers(tmp_path, file_format):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4, 6)).astype(np.float32)
    obj = {
        "epoch": 3,
        "big": 2**40,
        "negative": -5,
        "rate": 0.25,
        "name": "resnet50 ü",
        "flags": [True, False, None],
        "pair": (1, "a"),
        "state_dict": collections.OrderedDict(
            [
                ("transposed", matrix.T),  # F-ordered: its storage and strides are written
                ("sliced", matrix[:, 1:4]),  # copied to C order
                ("count", np.array(7, np.int64)),
                ("half", rng.standard_normal(5).astype(np.float16)),
                ("double", rng.standard_normal((2, 2))),
                ("bytes", np.arange(5, dtype=np.uint8)),
                ("mask", np.array([True, False])),
                ("ints", np.arange(6, dtype=np.int32).reshape(2, 3)),
                ("empty", np.zeros((0, 3), np.float32)),
            ]
        ),
    }
    path = tmp_path / "x.pth"
    tc.save(obj, path, file_format)
    back, read_format = tc.load(path)
    assert read_format == file_format
    assert {k: v for k, v in back.items() if k != "state_dict"} == {
        k: v for k, v in obj.items() if k != "state_dict"
    }
    assert list(back["state_dict"]) == list(obj["state_dict"])
    for key, value in obj["state_dict"].items():
        got = back["state_dict"][key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        np.testing.assert_array_equal(got, value)
    assert back["state_dict"]["transposed"].strides == (4, 24)  # the storage's, honoured
    if file_format == "zip":
        with zipfile.ZipFile(path) as archive:
            assert "x/data.pkl" in archive.namelist()


def _malicious_pickle(command):
    class Exploit:
        def __reduce__(self):
            return os.system, (command,)

    return pickle.dumps({"state_dict": Exploit()}, protocol=2)


def _legacy_with_object_pickle(path, payload):
    header = b"".join(
        tc._Emitter(True).dump(value)
        for value in (tc.LEGACY_MAGIC, tc.LEGACY_PROTOCOL, {"little_endian": True})
    )
    path.write_bytes(header + payload + tc._Emitter(True).dump([]))


def _zip_with_object_pickle(path, payload):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("container", [_legacy_with_object_pickle, _zip_with_object_pickle])
def test_a_pickle_asking_for_os_system_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    container(path, _malicious_pickle(f"touch {marker}"))
    with pytest.raises(tc.CheckpointError) as error:
        tc.load(path)
    message = str(error.value)
    assert "\n" not in message
    assert "refused" in message and f"{os.system.__module__}.system" in message
    assert "nothing was run" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_name", ["builtins\neval", "builtins\ngetattr", "torch\nload", "numpy\nfrombuffer"]
)
def test_every_global_outside_the_allowed_set_is_refused(tmp_path, global_name):
    path = tmp_path / "evil.pth"
    payload = b"\x80\x02c" + global_name.encode() + b"\n)R."
    _legacy_with_object_pickle(path, payload)
    with pytest.raises(tc.CheckpointError, match=global_name.replace("\n", r"\.")):
        tc.load(path)


def test_a_plain_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "plain.pkl"
    path.write_bytes(_malicious_pickle(f"touch {marker}"))
    with pytest.raises(tc.CheckpointError, match="not a PyTorch checkpoint"):
        tc.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["resnet50_w0125_linear", "resnet50_w0125_mlp"])
@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_a_truncated_file_is_one_line(tmp_path, name, fraction):
    data = (DATA / f"{name}.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(tc.CheckpointError, match="truncated") as error:
        tc.load(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "not a PyTorch checkpoint"),
        (b"", "empty file"),
        (None, "a zip file, but not a PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_torch_checkpoint_is_one_line(tmp_path, content, match):
    path = tmp_path / "other.pth"
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(tc.CheckpointError, match=match) as error:
        tc.load(path)
    assert "\n" not in str(error.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(tc.CheckpointError, match="cannot read"):
        tc.load(tmp_path / "absent.pth")


def test_sha256_of_a_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert tc.sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
