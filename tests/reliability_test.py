"""Nothing lost, nothing silently wrong: reruns with changed flags, torn and lost files, full
disks, corrupt checkpoints, a second writer, bad workdirs, symlink loops, serving limits.

Each test asserts the exact line a user sees, the files left behind, and that rerunning the
same command then completes; where the fault lost no finished epoch, the final checkpoint is
bitwise equal to the one of an uninterrupted run.
"""

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from invp_tf import analysis
from invp_tf import analyze
from invp_tf import data
from invp_tf import embed
from invp_tf import evaluate
from invp_tf import export
from invp_tf import import_checkpoint
from invp_tf import protocols
from invp_tf import rundir
from invp_tf import saved_model
from invp_tf import train
from invp_tf import training
from invp_tf import workdir as workdir_lib
from tests import conftest
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 2-epoch run, and the same run killed during epoch 1 (ckpt-1 on disk)."""
    root = tmp_path_factory.mktemp("runs")
    data_dir = root / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=64, num_test=24, height=12, width=12)
    straight = tiny_config(data_dir, root / "straight", epochs=2)
    training.train_and_evaluate(straight, straight.workdir)
    halfway = tiny_config(data_dir, root / "halfway", epochs=2)
    with pytest.raises(conftest.Interrupt):
        training.train_and_evaluate(
            halfway, halfway.workdir, callbacks=[conftest.InterruptAt(1, 1)]
        )
    return straight, halfway


def _copy(config, tmp_path, name="run"):
    """A copy of the run of `config` in tmp_path/name, and its config there."""
    target = tmp_path / name
    shutil.copytree(config.workdir, target)
    return dataclasses.replace(config, workdir=str(target))


def _checkpoints(workdir):
    return os.path.join(workdir, "checkpoints")


def _tensors(path):
    reader = tf.train.load_checkpoint(path)
    names = [n for n in reader.get_variable_to_shape_map() if "CHECKPOINTABLE_OBJECT" not in n]
    return {name: reader.get_tensor(name) for name in names}


def _assert_bitwise_equal(workdir_a, workdir_b):
    """The latest checkpoints of both runs hold the same variables, bit for bit."""
    a = _tensors(tf.train.latest_checkpoint(_checkpoints(workdir_a)))
    b = _tensors(tf.train.latest_checkpoint(_checkpoints(workdir_b)))
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _file_hashes(workdir):
    """{relative path: sha256} of every file in the run (tensorboard aside)."""
    hashes = {}
    for parent, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(parent, f)
            rel = os.path.relpath(path, workdir)
            if not rel.startswith("tensorboard"):
                with open(path, "rb") as fh:
                    hashes[rel] = hashlib.sha256(fh.read()).hexdigest()
    return hashes


def _epochs(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


# ---------------------------------------------------------------------------
# Reruns with changed flags.


def test_changed_model_flags_stop_before_anything_is_written(runs, tmp_path):
    straight, _ = runs
    run = _copy(straight, tmp_path)
    before = _file_hashes(run.workdir)
    changed = dataclasses.replace(run, head="linear", embedding_dim=32, encoder="resnet18")
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(changed, changed.workdir)
    assert str(error.value) == (
        f"--encoder=resnet18 --head=linear --embedding_dim=32 differ from the run in "
        f"{run.workdir} (--encoder=resnet18_cifar --head=mlp --embedding_dim=16 in flags.txt): "
        "a checkpoint cannot continue with another model, data, bank or optimizer; rerun with "
        "the run's values or use a new --workdir (a rerun may change only --epochs, "
        "--knn_k, --knn_temperature, --knn_features, --eval_every, --jit_compile, "
        "--strategy, --tpu, --cpu_devices, --device_memory_gb, --dry_run)"
    )
    assert _file_hashes(run.workdir) == before  # flags.txt, checkpoints, metrics untouched
    # Evaluation and export still see the trained model.
    assert workdir_lib.load_run(run.workdir).config.head == "mlp"


@pytest.mark.parametrize(
    "overrides,listed",
    [
        (dict(batch_size=32), "--batch_size=32 differs"),  # was: rewrote flags.txt, printed {}
        (dict(temperature=0.1, learning_rate=0.5), "--temperature=0.1 --learning_rate=0.5 differ"),
        (dict(image_size=10, augment="moco_v2"), "--image_size=10 --augment=moco_v2 differ"),
    ],
)
def test_changed_training_flags_stop_too(runs, tmp_path, overrides, listed):
    straight, _ = runs
    run = _copy(straight, tmp_path)
    before = _file_hashes(run.workdir)
    changed = dataclasses.replace(run, epochs=3, **overrides)
    with pytest.raises(workdir_lib.WorkdirError, match="^" + listed + " from the run in"):
        training.train_and_evaluate(changed, changed.workdir)
    assert _file_hashes(run.workdir) == before


def test_safe_flag_changes_are_accepted_and_recorded(runs, tmp_path):
    _, halfway = runs
    run = _copy(halfway, tmp_path)
    with open(os.path.join(run.workdir, "flags.txt")) as f:
        assert "--knn_k=10" in f.read()
    rerun = dataclasses.replace(run, knn_k=5, eval_every=2)
    training.train_and_evaluate(rerun, rerun.workdir)
    with open(os.path.join(run.workdir, "flags.txt")) as f:
        flags_text = f.read()
    assert "--knn_k=5" in flags_text and "--eval_every=2" in flags_text
    assert f"--workdir={run.workdir}" in flags_text
    with open(os.path.join(run.workdir, "flags_history.txt")) as f:
        history = f.read().splitlines()
    assert len(history) == 2, history  # the new run, then this rerun
    assert history[0].split(" ")[1:3] == ["new", "run:"]
    assert history[1].endswith(
        "resumed after epoch 1 with --knn_k=5 (was --knn_k=10), --eval_every=2 (was --eval_every=1)"
    )
    assert _epochs(run.workdir) == [0, 1]


# ---------------------------------------------------------------------------
# Lost or damaged files.


@pytest.mark.parametrize("damage", ["garbled", "deleted"])
def test_lost_checkpoint_state_file_resumes_exactly(runs, tmp_path, caplog, damage):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    state = os.path.join(_checkpoints(run.workdir), "checkpoint")
    if damage == "deleted":
        os.remove(state)
    else:
        with open(state, "w") as f:
            f.write('model_checkpoint_path: "ckpt-1"\x00\x17 garbage {{{')
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    problem = "garbled or stale" if damage == "garbled" else "missing"
    assert f"{state} is {problem}; rebuilt it from the checkpoint files (newest: ckpt-1)." in (
        caplog.text
    )
    assert _epochs(run.workdir) == [0, 1]  # epoch 0 was kept, not retrained
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_torn_metrics_line_is_dropped_and_the_epoch_reruns(runs, tmp_path, caplog):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    metrics = os.path.join(run.workdir, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"epoch": 1, "loss": 7.12, "loss_ins": 4.9')  # a crash during the append
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    assert f"{metrics} line 2 is incomplete (a crash while it was written); dropped" in caplog.text
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_unreadable_metrics_line_is_named(runs, tmp_path):
    _, halfway = runs
    run = _copy(halfway, tmp_path)
    metrics = os.path.join(run.workdir, "metrics.jsonl")
    with open(metrics) as f:
        row = f.read()
    with open(metrics, "w") as f:
        f.write(row[:40] + "\n" + row)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(run, run.workdir)
    assert str(error.value).startswith(f"{metrics} line 1 is unreadable (")
    assert str(error.value).endswith("); fix or delete that line and rerun")


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, caplog):
    straight, _ = runs
    run = _copy(straight, tmp_path)
    _truncate(os.path.join(_checkpoints(run.workdir), "ckpt-2.data-00000-of-00001"))
    ckpt_2 = os.path.join(_checkpoints(run.workdir), "ckpt-2")
    # Evaluate and export read the previous checkpoint, with a warning naming the bad one.
    with caplog.at_level(logging.WARNING):
        loaded = workdir_lib.load_run(run.workdir)
    assert loaded.epoch == 1 and loaded.checkpoint.endswith("ckpt-1")
    assert f"Cannot restore {ckpt_2}: Read less bytes than requested; trying an older" in (
        caplog.text
    )
    with pytest.raises(workdir_lib.WorkdirError) as error:
        workdir_lib.load_run(run.workdir, checkpoint="ckpt-2")
    assert str(error.value) == (
        f"no checkpoint of {run.workdir} can be restored: ckpt-2 (IndexError: Read less bytes "
        "than requested); restore the files from a backup or start a new --workdir"
    )
    # Training redoes epoch 1 from ckpt-1 and ends where the uninterrupted run ended.
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    corrupt = os.path.join(_checkpoints(run.workdir), "corrupt")
    assert f"Moved the unreadable ckpt-2 to {corrupt}." in caplog.text
    assert sorted(os.listdir(corrupt)) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_all_checkpoints_corrupt_stop_in_one_line(runs, tmp_path):
    straight, _ = runs
    run = _copy(straight, tmp_path)
    checkpoints = _checkpoints(run.workdir)
    _truncate(os.path.join(checkpoints, "ckpt-2.data-00000-of-00001"))
    with open(os.path.join(checkpoints, "ckpt-1.index"), "wb") as f:
        f.write(b"not an index")
    before = _file_hashes(run.workdir)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(run, run.workdir)
    message = str(error.value)
    assert message.startswith(f"no checkpoint of {run.workdir} can be restored: ckpt-2 (")
    assert "ckpt-1 (" in message and "\n" not in message
    assert _file_hashes(run.workdir) == before  # never restarted from scratch


def test_evaluate_and_export_refuse_a_checkpoint_that_does_not_match_flags(runs, tmp_path):
    """What the old code left behind: flags.txt rewritten by a refused rerun."""
    straight, _ = runs
    run = _copy(straight, tmp_path)
    flagfile = os.path.join(run.workdir, "flags.txt")
    with open(flagfile) as f:
        text = f.read()
    with open(flagfile, "w") as f:
        f.write(text.replace("--head=mlp\n", "--head=linear\n"))
    ckpt = os.path.join(_checkpoints(run.workdir), "ckpt-2")
    expected = (
        f"{ckpt} does not match {flagfile} (--encoder=resnet18_cifar --head=linear "
        "--width_multiplier=0.0625): "
    )
    with pytest.raises(workdir_lib.WorkdirError) as error:
        protocols.evaluate(protocols.make_settings(run.workdir, "knn", baselines=False))
    assert str(error.value).startswith(expected)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        saved_model.export_run(run.workdir, str(tmp_path / "models"), "invp")
    assert str(error.value).startswith(expected)
    assert not os.path.exists(tmp_path / "models" / "invp" / "1")
    with open(flagfile, "w") as f:
        f.write(text.replace("--embedding_dim=16\n", "--embedding_dim=32\n"))
    with pytest.raises(workdir_lib.WorkdirError) as error:
        workdir_lib.load_run(run.workdir)
    assert str(error.value) == (
        f"{ckpt} does not match {flagfile}: its bank has width 16, not --embedding_dim=32"
    )


# ---------------------------------------------------------------------------
# Full disks and other write errors.


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(runs, tmp_path, monkeypatch):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    checkpoints = _checkpoints(run.workdir)
    os.makedirs(os.path.join(checkpoints, "ckpt-7_temp"))  # left by an earlier crash
    save = tf.train.CheckpointManager.save

    def full_disk(self, checkpoint_number=None, **kwargs):
        temp = os.path.join(self.directory, f"ckpt-{checkpoint_number}_temp")
        os.makedirs(temp)
        with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
            f.write(b"half a checkpoint")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{temp}/part-00000-of-00001.data-00000-of-00001; No space left on device"
        )

    with monkeypatch.context() as patch:
        patch.setattr(tf.train.CheckpointManager, "save", full_disk)
        with pytest.raises(workdir_lib.WorkdirError) as error:
            training.train_and_evaluate(run, run.workdir)
    assert tf.train.CheckpointManager.save is save
    assert str(error.value) == (
        f"could not write checkpoint {checkpoints}/ckpt-2: No space left on device; the last "
        f"good checkpoint {checkpoints}/ckpt-1 is intact; free space and rerun the same command"
    )
    assert sorted(os.listdir(checkpoints)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert _epochs(run.workdir) == [0, 1]  # the row of the unsaved epoch; dropped on rerun
    training.train_and_evaluate(run, run.workdir)
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_full_disk_on_metrics_is_one_line(runs, tmp_path, monkeypatch):
    _, halfway = runs
    run = _copy(halfway, tmp_path)
    metrics = os.path.join(run.workdir, "metrics.jsonl")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tf.io.gfile, "rename", no_space)
        with pytest.raises(workdir_lib.WorkdirError) as error:
            training.train_and_evaluate(run, run.workdir)
    assert str(error.value) == f"could not write the metrics {metrics}: No space left on device"
    assert _epochs(run.workdir) == [0]


@pytest.mark.slow
def test_cli_on_a_file_size_limit_reports_the_checkpoint_and_reruns(tmp_path):
    """A real write failure (RLIMIT_FSIZE: 'File too large') in the CLI, then a rerun."""
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=64, num_test=24, height=12, width=12)
    config = tiny_config(data_dir, tmp_path / "run", epochs=1)
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("\n".join(config.flagfile_lines()) + "\n")
    command = [sys.executable, "-m", "invp_tf.train", f"--flagfile={flagfile}"]
    limit = (
        "import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "sys.argv = sys.argv[1:]; runpy.run_module('invp_tf.train', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", limit, *command[2:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    checkpoints = _checkpoints(config.workdir)
    assert result.stderr.strip().splitlines()[-1] == (
        f"invp_tf.train: error: could not write checkpoint {checkpoints}/ckpt-1: File too large; "
        "no checkpoint yet; free space and rerun the same command"
    )
    assert sorted(os.listdir(checkpoints)) == []
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert _epochs(config.workdir) == [0]
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-1")


# ---------------------------------------------------------------------------
# One writer per run, and workdirs that cannot hold one.


def test_second_training_stops_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    runs, tmp_path, caplog
):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("\n".join(run.flagfile_lines()) + "\n")
    lock = os.path.join(run.workdir, "train.lock")
    first = subprocess.Popen(
        [sys.executable, "-m", "invp_tf.train", f"--flagfile={flagfile}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # the first training, frozen while it holds the run
        before = _file_hashes(run.workdir)
        second = dataclasses.replace(run, learning_rate=0.5)
        with pytest.raises(workdir_lib.WorkdirError) as error:
            training.train_and_evaluate(second, second.workdir)
        assert str(error.value) == (
            f"{run.workdir} is in use by another training: pid {first.pid} on host "
            f"{socket.gethostname()} ({lock}); wait for it to end or stop it, or train into "
            "another --workdir"
        )
        assert _file_hashes(run.workdir) == before
    finally:
        first.kill()  # kill -9: its lock file stays behind
        first.wait()
    assert os.path.exists(lock)
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    assert f"Taking over {lock}: its process (pid {first.pid} on" in caplog.text
    assert not os.path.exists(lock)  # released on exit
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_workdir_that_is_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "file"
    path.write_text("not a folder")
    monkeypatch.chdir(REPO)  # the recipe's path is relative to the repo root
    with pytest.raises(SystemExit) as stopped:
        train.main(["invp-train", f"--workdir={path}", "--flagfile=configs/fashion_mnist.flags"])
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"invp_tf.train: error: --workdir={path} is a file, not a folder"
    )
    with pytest.raises(workdir_lib.WorkdirError) as error:
        rundir.RunDir.check(str(path / "run"))
    assert str(error.value) == f"--workdir={path}/run cannot be created: {path} is a file"
    # Permissions (tests run as root here, so os.access stands in for a read-only folder).
    monkeypatch.setattr(os, "access", lambda *args: False)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        rundir.RunDir.check(str(tmp_path / "new" / "run"))
    assert str(error.value) == (
        f"--workdir={tmp_path}/new/run cannot be created in {tmp_path} (permission denied)"
    )
    with pytest.raises(workdir_lib.WorkdirError) as error:
        rundir.RunDir.check(str(tmp_path))
    assert str(error.value) == f"--workdir={tmp_path} is not writable (permission denied)"


def test_refused_flags_leave_no_workdir(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", num_background=65)
    with pytest.raises(ValueError, match="--num_background=65 exceeds"):
        training.train_and_evaluate(config, config.workdir)
    assert not os.path.exists(config.workdir)


# ---------------------------------------------------------------------------
# Data.


def test_symlink_loop_lists_each_image_once(tmp_path, caplog):
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.symlink(root, root / "a" / "loop")  # a link back to the top: a loop
    os.symlink(root / "b", root / "b_again")  # a second name for b
    with caplog.at_level(logging.WARNING):
        found = data.list_images(str(root))
    assert found == [f"{c}/{i}.png" for c in ("a", "b") for i in range(5)]
    assert (
        f"Skipping {root}/a/loop: it links to {root}, a folder above it (a symlink loop)."
        in caplog.text
    )
    assert f"Skipping {root}/b_again: it links to {root}/b, a folder listed already." in (
        caplog.text
    )


def test_image_size_below_the_minimum_is_refused(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", image_size=1)
    with pytest.raises(ValueError) as error:
        training.train_and_evaluate(config, config.workdir)
    assert str(error.value) == (
        "--image_size=1 must be >= 8 (smaller crops leave the encoder nothing to see)"
    )
    assert not os.path.exists(config.workdir)


# ---------------------------------------------------------------------------
# Serving.


def _png_header_only(width, height):
    """A PNG whose header says width x height (the data after it does not matter here)."""

    def chunk(kind, body):
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_serving_empty_batches_give_empty_outputs(runs, tmp_path):
    straight, _ = runs
    path = saved_model.export_run(straight.workdir, str(tmp_path / "models"), "invp")
    # Through the TF1 loader of saved_model_cli and TF Serving.
    empty = saved_model.run_signatures_tf1(
        path,
        {
            "serving_default": {"images": np.zeros([0, 12, 12, 3], np.float32)},
            "serving_bytes": {"image_bytes": np.array([], dtype=object)},
        },
    )
    for outputs in empty.values():
        assert outputs["embedding"].shape == (0, 16) and outputs["features"].shape == (0, 32)
    # saved_model_cli run itself, the documented way to check an export.
    np.save(tmp_path / "empty.npy", np.zeros([0, 12, 12, 3], np.float32))
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
            "run",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'empty.npy'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Result for output key embedding:\n[]" in result.stdout


def test_serving_bytes_refuses_images_above_the_pixel_limit(runs, tmp_path):
    straight, _ = runs
    path = saved_model.export_run(
        straight.workdir, str(tmp_path / "models"), "invp", max_image_pixels=1000
    )
    with open(os.path.join(path, "assets", saved_model.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["max_image_pixels"] == 1000 and metadata["checkpoint"] == "ckpt-2"
    # Within the limit: decoded; above it: refused from the header, before decoding.
    small = tf.io.encode_png(np.zeros([20, 50, 3], np.uint8)).numpy()
    ok = saved_model.run_signatures_tf1(
        path, {"serving_bytes": {"image_bytes": np.array([small], dtype=object)}}
    )
    assert ok["serving_bytes"]["embedding"].shape == (1, 16)
    jpeg = tf.io.encode_jpeg(np.zeros([30, 40, 3], np.uint8)).numpy()
    for huge, pixels in [(_png_header_only(100_000, 100_000), 10**10), (jpeg, 1200)]:
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            saved_model.run_signatures_tf1(
                path, {"serving_bytes": {"image_bytes": np.array([small, huge], dtype=object)}}
            )
        assert (
            f"image_bytes[1] has {pixels} pixels (width x height), above the limit of 1000 of "
            "this export (--max_image_pixels of invp_tf.export)"
        ) in str(error.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_header_pixels_of_each_format(fmt):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros([23, 37, 3], np.uint8)).save(buffer, format=fmt)
    assert int(saved_model._header_pixels(tf.constant(buffer.getvalue()))) == 23 * 37


def test_analyze_reads_a_run_with_a_torn_metrics_line(runs, tmp_path, caplog):

    _, halfway = runs
    run = _copy(halfway, tmp_path)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 1, "lo')
    with caplog.at_level(logging.WARNING):
        assert [row["epoch"] for row in analysis.read_metrics(run.workdir)] == [0]
    assert "line 2 is incomplete (a crash while it was written); dropped" in caplog.text


# ---------------------------------------------------------------------------
# The run lock, the paths a command writes, and Ctrl-C.


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.f.close()


def _flagfile(config, tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("\n".join(config.flagfile_lines()) + "\n")
    return flagfile


def test_full_disk_when_training_starts_is_one_line_and_leaves_no_lock(
    runs, tmp_path, monkeypatch, capsys
):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    flagfile = _flagfile(run, tmp_path)
    before = _file_hashes(run.workdir)
    fdopen = os.fdopen

    def full_disk_on_the_lock(fd, *args, **kwargs):
        f = fdopen(fd, *args, **kwargs)
        return _FullDisk(f) if "train.lock" in os.readlink(f"/proc/self/fd/{fd}") else f

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", full_disk_on_the_lock)
        with pytest.raises(SystemExit) as stopped:
            train.main(["invp-train", f"--flagfile={flagfile}"])
    assert stopped.value.code == 1
    lock = os.path.join(run.workdir, "train.lock")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"invp_tf.train: error: could not write the lock file {lock}: No space left on device; "
        "the run is unchanged: free space (or fix the permission) and rerun the same command"
    )
    assert _file_hashes(run.workdir) == before  # no lock, empty or not, nor its temporary file
    training.train_and_evaluate(run, run.workdir)
    assert not os.path.exists(lock)  # released at the end of the run
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_an_empty_lock_is_taken_over_and_a_garbled_one_is_named(runs, tmp_path, caplog):
    straight, halfway = runs
    run = _copy(halfway, tmp_path, "garbled")
    lock = os.path.join(run.workdir, "train.lock")
    for text, problem in [("", "is empty"), ('\x00\x17{"pid": 1', "is garbled")]:
        with open(lock, "w") as f:
            f.write(text)  # an empty lock written just now may be a training starting
        before = _file_hashes(run.workdir)
        with pytest.raises(workdir_lib.WorkdirError) as error:
            training.train_and_evaluate(run, run.workdir)
        assert str(error.value) == (
            f"{lock} {problem} (it names no training); if no training is writing "
            f"{run.workdir}, delete it and rerun the same command"
        )
        assert _file_hashes(run.workdir) == before
    # An empty lock a minute old: left by a training that stopped while writing it.
    run = _copy(halfway, tmp_path, "empty")
    lock = os.path.join(run.workdir, "train.lock")
    open(lock, "w").close()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    assert (
        f"Taking over {lock}: it is empty, left by a training that stopped while writing it "
        "(a full disk or a crash)."
    ) in caplog.text
    assert not os.path.exists(lock)
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_every_command_checks_the_path_it_writes_before_any_work(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing")  # never read: the check comes first
    commands = [  # (module, its other flags, the flag of the path it writes, kind, suffix)
        (train, ["--flagfile=configs/fashion_mnist.flags"], "workdir", "folder", ""),
        (evaluate, [f"--workdir={missing}", "--protocol=knn"], "output", "file", ".json"),
        (export, [f"--workdir={missing}"], "export_dir", "folder", ""),
        (analyze, [f"--workdir={missing}"], "output", "folder", ""),
        (embed, [f"--model={missing}", "--dataset=fashion_mnist"], "output", "file", ".npy"),
        (import_checkpoint, [f"--checkpoint={missing}.pth"], "workdir", "folder", ""),
    ]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.chdir(REPO)  # the recipe's path is relative to the repo root

    def error_line(module, args):
        with pytest.raises(SystemExit) as stopped:
            module.main([module.__name__, *args])
        assert stopped.value.code == 1
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        return stderr.strip().splitlines()[-1]

    for module, args, flag, kind, suffix in commands:
        name = module.__name__
        wrong = blocker
        if kind == "file":
            wrong = tmp_path / f"folder{suffix}"
            wrong.mkdir()
        other = "a file" if kind == "folder" else "a folder"
        below = blocker / f"out{suffix}"
        cases = [
            (below, f"--{flag}={below} cannot be created: {blocker} is a file"),
            (wrong, f"--{flag}={wrong} is {other}, not a {kind}"),
        ]
        for path, message in cases:
            assert error_line(module, [*args, f"--{flag}={path}"]) == f"{name}: error: {message}"
        with monkeypatch.context() as patch:  # tests run as root: os.access stands in
            patch.setattr(os, "access", lambda *a: False)
            path = tmp_path / "new" / f"out{suffix}"
            assert error_line(module, [*args, f"--{flag}={path}"]) == (
                f"{name}: error: --{flag}={path} cannot be created in {tmp_path} "
                "(permission denied)"
            )


def test_ctrl_c_saves_stops_in_one_line_and_resumes_exactly(runs, tmp_path):
    straight, _ = runs
    run = dataclasses.replace(straight, workdir=str(tmp_path / "run"))
    flagfile = _flagfile(run, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "invp_tf.train", f"--flagfile={flagfile}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in process.stderr:  # Ctrl-C once the first epoch's steps begin
            lines.append(line)
            if "epoch 1/2: training 4 steps" in line:
                process.send_signal(signal.SIGINT)
                break
        lines += process.stderr.readlines()
        process.wait(timeout=300)
    finally:
        process.kill()
        process.wait()
    stderr = "".join(lines)
    assert process.returncode == training.PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoints = _checkpoints(run.workdir)
    last = stderr.strip().splitlines()[-1]
    saved = re.fullmatch(
        rf"invp_tf.train: interrupted \(Ctrl-C\): saved {checkpoints}/ckpt-(\d) at step (\d); "
        "rerun the same command to resume",
        last,
    )
    assert saved and saved[1] == saved[2] and 0 < int(saved[1]) <= 4, last
    assert not os.path.exists(os.path.join(run.workdir, "train.lock"))
    training.train_and_evaluate(run, run.workdir)
    assert _epochs(run.workdir) == [0, 1]
    # Every variable bit for bit, but the counters of saves, which count the extra one.
    a = _tensors(tf.train.latest_checkpoint(_checkpoints(straight.workdir)))
    b = _tensors(tf.train.latest_checkpoint(checkpoints))
    saves = {"save_counter": (2, 3), "checkpointed_runs": (0, 1)}
    assert sorted(a) == sorted(b)
    for name in a:
        part = name.split("/")[0]
        if part in saves:
            assert (int(a[name]), int(b[name])) == saves[part], name
        else:
            assert np.array_equal(a[name], b[name]), name


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(runs, tmp_path, monkeypatch):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)

    class CtrlCTwice(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            signal.raise_signal(signal.SIGINT)  # saves after the next steps...
            signal.raise_signal(signal.SIGINT)  # ... unless pressed again: stop now

    with pytest.raises(training.Interrupted) as error:
        training.train_and_evaluate(run, run.workdir, [CtrlCTwice()])
    checkpoints = _checkpoints(run.workdir)
    assert str(error.value) == (
        f"interrupted (Ctrl-C) without a save; {checkpoints}/ckpt-1 is kept; rerun the same "
        "command to resume from it"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    assert sorted(os.listdir(checkpoints)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert not os.path.exists(os.path.join(run.workdir, "train.lock"))
    training.train_and_evaluate(run, run.workdir)
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)
    # Before training began (here: reading the data), Ctrl-C stops at once too.
    fresh = dataclasses.replace(straight, workdir=str(tmp_path / "fresh"))
    monkeypatch.setattr(data, "load_source", lambda *a: signal.raise_signal(signal.SIGINT))
    with pytest.raises(training.Interrupted) as error:
        training.train_and_evaluate(fresh, fresh.workdir)
    assert str(error.value) == (
        "interrupted (Ctrl-C) before the first checkpoint; rerun the same command to start"
    )
