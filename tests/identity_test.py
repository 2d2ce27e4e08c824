"""invp_tf.identity: the record a checkpoint carries, and the one line naming what changed in
a run's training data, for each dataset form."""

import pytest

from invp_tf import config as config_lib
from invp_tf import identity
from invp_tf import workdir as workdir_lib


def _record(dataset, checkpoint="/runs/a/checkpoints/ckpt-3"):
    return identity.Record(config_lib.Config(workdir="/runs/a"), dataset, checkpoint)


_TFDS = {
    "dataset": "tfds:cifar10",
    "split": "train",
    "examples": 50000,
    "fingerprint": "f1",
    "tfds": {"name": "cifar10", "version": "3.0.2", "split": "train"},
}


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(tfds=dict(_TFDS["tfds"], version="3.0.3")), "tfds version 3.0.3 (the run's: 3.0.2)"),
        (
            dict(examples=1000, tfds=dict(_TFDS["tfds"], split="train[:1000]")),
            "examples 1000 (the run's: 50000), tfds split train[:1000] (the run's: train)",
        ),
        (dict(), "its fingerprint differs (the run's: f1)"),
    ],
)
def test_changed_tfds_data_is_named(change, named):
    now = dict(_TFDS, fingerprint="f2", **change)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        identity.check_dataset("/runs/a", _record(_TFDS), now, None)
    assert str(error.value) == (
        "the training data of --dataset=tfds:cifar10 changed since the run in /runs/a was "
        f"trained on it (ckpt-3): {named}; its memory bank holds one row per training example, "
        "so it cannot continue on other data: restore the data or train into a new --workdir"
    )


def test_same_data_or_unknown_data_passes():
    identity.check_dataset("/runs/a", _record(_TFDS), dict(_TFDS), None)
    identity.check_dataset("/runs/a", _record(None), dict(_TFDS, fingerprint="f2"), None)


def test_idx_file_read_instead_is_named():
    old = {"dataset": "mnist", "split": "train", "examples": 9, "fingerprint": "a"}
    old["files"] = {"train-images-idx3-ubyte.gz": "0" * 64, "train-labels-idx1-ubyte.gz": "1" * 64}
    new = dict(old, fingerprint="b", files=dict(old["files"]))
    new["files"]["train-images-idx3-ubyte"] = new["files"].pop("train-images-idx3-ubyte.gz")
    with pytest.raises(
        workdir_lib.WorkdirError,
        match=(
            r"\(ckpt-3\): train-images-idx3-ubyte is read instead, "
            r"train-images-idx3-ubyte.gz is no longer read; its memory"
        ),
    ):
        identity.check_dataset("/runs/a", _record(old), new, None)


def test_listing_changes_counts_and_names_at_most_five():
    old = [["a/1.png", 10], ["a/2.png", 10], ["b/3.png", 10]]
    new = [["a/1.png", 10], ["b/3.png", 11]] + [[f"c/{i}.png", 1] for i in range(7)]
    assert identity.listing_changes(old, new) == (
        "7 added (c/0.png, c/1.png, c/2.png, c/3.png, c/4.png and 2 more), 1 removed (a/2.png), "
        "1 replaced (size changed: b/3.png)"
    )


def test_a_folder_without_its_listing_still_stops(tmp_path):
    old = {"dataset": "folder:/x", "split": "train", "examples": 3, "fingerprint": "a"}
    new = dict(old, fingerprint="b")
    with pytest.raises(workdir_lib.WorkdirError) as error:
        identity.check_dataset(str(tmp_path), _record(old), new, [["a.png", 1]])
    assert ": other images (dataset.json.gz, the listing the run was trained on, is missing, " in (
        str(error.value)
    )
