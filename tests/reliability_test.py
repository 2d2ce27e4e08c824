"""Nothing lost, nothing silently wrong: reruns with changed flags, torn and lost files, full
disks, corrupt checkpoints, a second writer, bad workdirs, symlink loops, serving limits,
diverged states, a lost or edited flags.txt, changed or vanished training data.

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
from invp_tf import identity
from invp_tf import image_headers
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
    cases = [
        (_png_header_only(100_000, 100_000), "100000x100000 (width x height) = 10000000000"),
        (jpeg, "40x30 (width x height) = 1200"),
    ]
    for huge, shape in cases:
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            saved_model.run_signatures_tf1(
                path, {"serving_bytes": {"image_bytes": np.array([small, huge], dtype=object)}}
            )
        assert (
            f"image_bytes[1] decodes to 1 frame(s) of {shape} pixels, above the limit of 1000 "
            "of this export (--max_image_pixels of invp_tf.export)"
        ) in str(error.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_header_shape_of_each_format(fmt):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros([23, 37, 3], np.uint8)).save(buffer, format=fmt)
    assert _shape(buffer.getvalue()) == (1, 37, 23)  # frames, width, height


def test_analyze_reads_a_run_with_a_torn_metrics_line(runs, tmp_path, caplog):

    _, halfway = runs
    run = _copy(halfway, tmp_path)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 1, "lo')
    with caplog.at_level(logging.WARNING):
        assert [row["epoch"] for row in analysis.read_metrics(run.workdir)] == [0]
    assert "line 2 is incomplete (a crash while it was written); dropped" in caplog.text


# ---------------------------------------------------------------------------
# Poisoned checkpoints, the run's identity and the dataset's identity.

_ONLY = (
    "a checkpoint cannot continue with another model, data, bank or optimizer; rerun with the "
    "run's values or use a new --workdir (a rerun may change only --epochs, --knn_k, "
    "--knn_temperature, --knn_features, --eval_every, --jit_compile, --strategy, --tpu, "
    "--cpu_devices, --device_memory_gb, --dry_run)"
)


class _PoisonMovingVariance(keras.callbacks.Callback):
    """Sets the stem BatchNorm's moving variance to inf when the fit of the process's
    `fit`-th epoch begins: training reads batch statistics, so the loss stays finite."""

    def __init__(self, fit):
        super().__init__()
        self.fits, self.fit = 0, fit

    def on_train_begin(self, logs=None):
        self.fits += 1
        if self.fits - 1 == self.fit:
            for variable in self.model.encoder.weights:
                if variable.path == "encoder/backbone/stem_bn/moving_variance":
                    variable.assign(np.full(variable.shape, np.inf, np.float32))


def test_a_diverged_state_with_a_finite_loss_is_not_saved(tiny_idx_dir, tmp_path):
    # The recipe: BatchNorm's moving variance overflows while the loss stays finite.
    config = tiny_config(
        tiny_idx_dir,
        tmp_path / "run",
        epochs=2,
        head="mlp_bn",
        learning_rate=1e4,
        weight_decay=0.05,
    )
    with pytest.raises(training.TrainingError) as error:
        training.train_and_evaluate(config, config.workdir)
    assert re.fullmatch(
        r"the state after epoch 0 holds inf or NaN in encoder/backbone/\S+ and \d+ more "
        r"variables; nothing was saved for this epoch, no good checkpoint was saved yet "
        r"\(lower --learning_rate or --weight_decay\)",
        str(error.value),
    ), str(error.value)
    assert os.listdir(_checkpoints(config.workdir)) == []
    assert not os.path.exists(os.path.join(config.workdir, "metrics.jsonl"))
    # No checkpoint yet: the rerun may change any flag, and trains.
    rerun = dataclasses.replace(config, learning_rate=0.05, weight_decay=5e-4)
    training.train_and_evaluate(rerun, rerun.workdir)
    assert _epochs(rerun.workdir) == [0, 1]


def test_checkpoints_holding_inf_are_never_saved_nor_used(runs, tmp_path, monkeypatch, caplog):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    ckpt_1, ckpt_2 = (os.path.join(_checkpoints(run.workdir), f"ckpt-{n}") for n in (1, 2))
    inf = "inf or NaN in encoder/backbone/stem_bn/moving_variance"
    # Checked before every save: the run stops, ckpt-1 stays the last good checkpoint.
    with pytest.raises(training.TrainingError) as error:
        training.train_and_evaluate(run, run.workdir, callbacks=[_PoisonMovingVariance(0)])
    assert str(error.value) == (
        f"the state after epoch 1 holds {inf}; nothing was saved for this epoch, the last good "
        f"checkpoint is {ckpt_1} (lower --learning_rate or --weight_decay)"
    )
    assert sorted(os.listdir(_checkpoints(run.workdir))) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert _epochs(run.workdir) == [0]
    # What older versions did: save that state as ckpt-2, as if it were good.
    with monkeypatch.context() as patch:
        patch.setattr(workdir_lib, "nonfinite_variables", lambda variables: [])
        training.train_and_evaluate(run, run.workdir, callbacks=[_PoisonMovingVariance(0)])
    # Evaluate and export fall back to ckpt-1 with a warning, and refuse ckpt-2 in one line.
    with caplog.at_level(logging.WARNING):
        assert workdir_lib.load_run(run.workdir).checkpoint == ckpt_1
    assert f"Cannot restore {ckpt_2}: it holds {inf}; trying an older checkpoint." in caplog.text
    refused = (
        f"no checkpoint of {run.workdir} is finite: ckpt-2 ({inf}); the training diverged "
        "before it was saved: train into a new --workdir with a lower --learning_rate"
    )
    with pytest.raises(workdir_lib.WorkdirError) as error:
        saved_model.export_run(run.workdir, str(tmp_path / "models"), "invp", checkpoint="ckpt-2")
    assert str(error.value) == refused
    with pytest.raises(workdir_lib.WorkdirError) as error:
        protocols.evaluate(
            protocols.make_settings(run.workdir, "knn", baselines=False, checkpoint="ckpt-2")
        )
    assert str(error.value) == refused
    # Training skips it, sets it aside and redoes epoch 1 from ckpt-1, as if it never was.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    corrupt = os.path.join(_checkpoints(run.workdir), "corrupt")
    assert f"Cannot restore {ckpt_2}: it holds {inf}; trying an older checkpoint." in caplog.text
    assert f"Moved the non-finite ckpt-2 to {corrupt}." in caplog.text
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


@pytest.mark.parametrize(
    "overrides,refused",
    [
        (dict(seed=1), "--seed=1 differs from the run in {} (--seed=3 in its checkpoint"),
        (
            dict(temperature=0.5),
            "--temperature=0.5 differs from the run in {} (--temperature=0.2 in its checkpoint",
        ),
        (
            dict(head="linear"),
            "--head=linear differs from the run in {} (--head=mlp in its checkpoint",
        ),
    ],
)
def test_a_rerun_without_flags_txt_is_checked_against_the_checkpoint(
    runs, tmp_path, caplog, overrides, refused
):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    flagfile = os.path.join(run.workdir, "flags.txt")
    os.remove(flagfile)
    before = _file_hashes(run.workdir)
    changed = dataclasses.replace(run, **overrides)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(changed, changed.workdir)
    assert str(error.value) == (
        refused.format(run.workdir) + f" ckpt-1; flags.txt is missing): {_ONLY}"
    )
    assert _file_hashes(run.workdir) == before
    # The run's own flags: flags.txt comes back from the checkpoint's record.
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    assert (
        f"{flagfile} is missing; rewrote it from the run's record in checkpoint ckpt-1."
        in caplog.text
    )
    with open(flagfile) as f:
        assert f.read() == "\n".join(run.flagfile_lines()) + "\n"
    with open(os.path.join(run.workdir, "flags_history.txt")) as f:
        assert (
            f.read()
            .splitlines()[-1]
            .endswith("flags.txt is missing: rewritten from the record in ckpt-1")
        )
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_an_edited_flags_txt_is_checked_against_the_checkpoint(runs, tmp_path, caplog):
    straight, halfway = runs
    run = _copy(halfway, tmp_path)
    flagfile = os.path.join(run.workdir, "flags.txt")
    with open(flagfile) as f:
        text = f.read()
    with open(flagfile, "w") as f:
        f.write(text.replace("--seed=3\n", "--seed=1\n"))
    before = _file_hashes(run.workdir)
    changed = dataclasses.replace(run, seed=1)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(changed, changed.workdir)
    assert str(error.value) == (
        f"--seed=1 differs from the run in {run.workdir} (--seed=3 in its checkpoint ckpt-1; "
        f"flags.txt was edited): {_ONLY}"
    )
    assert _file_hashes(run.workdir) == before
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(run, run.workdir)
    assert (
        f"{flagfile} was edited (--seed=1; the record: --seed=3); rewrote it from the run's "
        "record in checkpoint ckpt-1." in caplog.text
    )
    assert "--seed=3\n" in open(flagfile).read()
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_a_checkpoint_without_a_record_resumes_by_flags_txt_and_gets_one(
    runs, tmp_path, monkeypatch
):
    """Checkpoints of older versions carry no identity: flags.txt is the record, as before."""
    straight, _ = runs
    legacy = dataclasses.replace(straight, workdir=str(tmp_path / "legacy"))
    checkpoint = tf.train.Checkpoint

    def without_identity(identity=None, **parts):  # the checkpoint layout of older versions
        return checkpoint(**parts)

    with monkeypatch.context() as patch, pytest.raises(conftest.Interrupt):
        patch.setattr(tf.train, "Checkpoint", without_identity)
        training.train_and_evaluate(legacy, legacy.workdir, callbacks=[conftest.InterruptAt(1, 1)])
    assert identity.read(legacy.workdir) is None
    changed = dataclasses.replace(legacy, seed=1)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(changed, changed.workdir)
    assert str(error.value) == (
        f"--seed=1 differs from the run in {legacy.workdir} (--seed=3 in flags.txt): {_ONLY}"
    )
    training.train_and_evaluate(legacy, legacy.workdir)
    assert _epochs(legacy.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, legacy.workdir)
    record = identity.read(legacy.workdir)  # the checkpoints saved now carry the record
    assert record.config == legacy and record.checkpoint.endswith("ckpt-2")
    source = data.load_source("fashion_mnist", "train", legacy.data_dir)
    assert record.dataset == identity.dataset_record(source)


def _image_folder(root, num_train=64, num_test=24):
    """A folder dataset: train/ and test/, each with class folders a, b, c of 12x12 PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_train), ("test", num_test)):
        for i in range(n):
            path = root / split / "abc"[i % 3] / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            path.write_bytes(tf.io.encode_png(pixels).numpy())
    return root


def test_changed_training_images_stop_the_rerun_naming_them(tmp_path):
    root = _image_folder(tmp_path / "images")
    config = tiny_config("", tmp_path / "run", dataset=f"folder:{root}", epochs=1)
    training.train_and_evaluate(config, config.workdir)
    train = root / "train"
    # The run keeps the listing it was trained on.
    listed = identity.read_listing(config.workdir)["files"]
    names = data.list_images(str(train))
    assert listed == [[f"train/{name}", os.path.getsize(train / name)] for name in names]
    rerun = dataclasses.replace(config, epochs=2)
    before = _file_hashes(config.workdir)
    start = (
        f"the training images of --dataset=folder:{root} changed since the run in "
        f"{config.workdir} was trained on it (ckpt-1): "
    )
    end = (
        "; its memory bank holds one row per training example, so it cannot continue on other "
        "images: restore the images or train into a new --workdir"
    )
    original = (train / "b" / "01.png").read_bytes()

    def swap():  # one file removed, another added: the same number of images
        os.rename(train / "a" / "00.png", train / "c" / "99.png")

    def grow():
        for i in range(6):
            (train / "b" / f"x{i}.png").write_bytes(original)

    def replace():
        (train / "b" / "01.png").write_bytes(
            tf.io.encode_png(np.zeros([12, 12, 3], np.uint8)).numpy()
        )

    def undo():
        if (train / "c" / "99.png").exists():
            os.rename(train / "c" / "99.png", train / "a" / "00.png")
        for i in range(6):
            (train / "b" / f"x{i}.png").unlink(missing_ok=True)
        (train / "b" / "01.png").write_bytes(original)

    for change, changes in [
        (swap, "1 added (train/c/99.png), 1 removed (train/a/00.png)"),
        (
            grow,
            "6 added (train/b/x0.png, train/b/x1.png, train/b/x2.png, train/b/x3.png, "
            "train/b/x4.png and 1 more)",
        ),
        (replace, "1 replaced (size changed: train/b/01.png)"),
    ]:
        change()
        with pytest.raises(workdir_lib.WorkdirError) as error:
            training.train_and_evaluate(rerun, rerun.workdir)
        assert str(error.value) == start + changes + end
        assert _file_hashes(config.workdir) == before
        undo()
    training.train_and_evaluate(rerun, rerun.workdir)
    assert _epochs(rerun.workdir) == [0, 1]


def test_changed_idx_bytes_stop_the_rerun_naming_the_file(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", epochs=1)
    training.train_and_evaluate(config, config.workdir)
    images = tiny_idx_dir / "train-images-idx3-ubyte.gz"
    old = hashlib.sha256(images.read_bytes()).hexdigest()
    with open(tiny_idx_dir / "train-images-idx3-ubyte.gz", "rb") as f:
        kept = f.read()
    # Other pixels, the same labels, shape and size.
    conftest.write_idx(images, np.zeros([64, 12, 12], np.uint8))
    new = hashlib.sha256(images.read_bytes()).hexdigest()
    rerun = dataclasses.replace(config, epochs=2)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        training.train_and_evaluate(rerun, rerun.workdir)
    assert str(error.value) == (
        f"the training data of --dataset=fashion_mnist changed since the run in "
        f"{config.workdir} was trained on it (ckpt-1): train-images-idx3-ubyte.gz has other "
        f"bytes (sha256 {new[:12]}..., the run's {old[:12]}...); its memory bank holds one row "
        "per training example, so it cannot continue on other data: restore the data or train "
        "into a new --workdir"
    )
    images.write_bytes(kept)
    training.train_and_evaluate(rerun, rerun.workdir)
    assert _epochs(rerun.workdir) == [0, 1]


class _MoveAwayAt(keras.callbacks.Callback):
    """Moves `path` to `away` when the fit of epoch `epoch` begins: a file lost mid-run."""

    def __init__(self, epoch, path, away):
        super().__init__()
        self.fits, self.epoch, self.path, self.away = 0, epoch, path, away

    def on_train_begin(self, logs=None):
        self.fits += 1
        if self.fits - 1 == self.epoch:
            os.rename(self.path, self.away)


def test_an_image_lost_while_training_stops_in_one_line(tmp_path):
    root = _image_folder(tmp_path / "images")
    straight = tiny_config("", tmp_path / "straight", dataset=f"folder:{root}", epochs=2)
    training.train_and_evaluate(straight, straight.workdir)
    run = dataclasses.replace(straight, workdir=str(tmp_path / "run"))
    lost, away = root / "train" / "b" / "04.png", tmp_path / "away.png"
    with pytest.raises(ValueError) as error:
        training.train_and_evaluate(run, run.workdir, callbacks=[_MoveAwayAt(1, lost, away)])
    checkpoints = _checkpoints(run.workdir)
    assert str(error.value) == (
        f"unreadable image: {lost} is gone (epoch 1); nothing was saved for this epoch, the "
        f"last good checkpoint is {checkpoints}/ckpt-1; training stops, as each image owns a "
        "row of the memory bank: restore the file and rerun the same command"
    )
    assert sorted(os.listdir(checkpoints)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert _epochs(run.workdir) == [0]
    # Rerun before the file is back: named again, before anything is written.
    with pytest.raises(workdir_lib.WorkdirError, match=r": 1 removed \(train/b/04.png\); its"):
        training.train_and_evaluate(run, run.workdir)
    os.rename(away, lost)
    training.train_and_evaluate(run, run.workdir)
    assert _epochs(run.workdir) == [0, 1]
    _assert_bitwise_equal(straight.workdir, run.workdir)


def test_image_files_of_other_formats_are_named_at_start(tmp_path, caplog):
    folder = tmp_path / "images"
    for name in ("a/1.png", "a/2.png", "b/3.jpg", "b/4.webp", "c/5.tiff", "c/6.heic", "7.TIF"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(tf.io.encode_png(np.zeros([4, 4, 3], np.uint8)).numpy())
    (folder / "b" / "3.jpg").write_bytes(tf.io.encode_jpeg(np.zeros([4, 4, 3], np.uint8)).numpy())
    with caplog.at_level(logging.WARNING):
        source = data.load_source(f"folder:{folder}", "train")
    assert source.num_examples == 3
    assert (
        f"{folder} holds 4 image file(s) in formats this code does not read (it reads .jpg, "
        ".jpeg, .png, .bmp, .gif), left out: 7.TIF, b/4.webp, c/5.tiff, c/6.heic; convert them "
        "to JPEG or PNG to use them." in caplog.text
    )


# Decoding limits of serving_bytes and folder data; export leftovers and local paths.


def _gif_walk(data):
    """Oracle: [(start, end, width, height)] of every image descriptor of a GIF, walked in
    plain Python as giflib reads it (an extension is its label, a first sub-block, then a chain
    of sub-blocks up to one of length 0; a descriptor cut short is not a frame); and where the
    walk stopped."""
    table = lambda packed: 3 << ((packed & 7) + 1) if packed & 0x80 else 0  # noqa: E731
    pos, frames = 13 + table(data[10]), []
    while pos < len(data) and data[pos] in (0x21, 0x2C):
        start = pos
        if data[pos] == 0x2C:
            if pos + 10 > len(data):
                break
            size = [int.from_bytes(data[pos + i : pos + i + 2], "little") for i in (5, 7)]
            pos += 11 + table(data[pos + 9])
        else:
            pos += 3 + data[pos + 2]
        while pos < len(data) and data[pos]:
            pos += 1 + data[pos]
        pos += 1
        if data[start] == 0x2C:
            frames.append((start, min(pos, len(data)), *size))
    return frames, pos


def _pil_gif(pixels):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="GIF")
    return buffer.getvalue()


def _gif(sizes, screen=(1, 1), between=b"", noise=False):
    """A GIF whose logical screen is `screen` and whose frames have `sizes` (width, height):
    the header and palette of a Pillow GIF, then each frame's block cut from a Pillow GIF of
    that size (`noise`: random pixels, so the data takes many full 255-byte sub-blocks), with
    the bytes `between` before each frame."""
    rng = np.random.default_rng(0)
    frames, head = [], None
    for width, height in sizes:
        pixels = rng.integers(0, 256, size=(height, width), dtype=np.uint8) if noise else None
        encoded = _pil_gif(np.zeros((height, width), np.uint8) if pixels is None else pixels)
        ((start, end, _, _),) = _gif_walk(encoded)[0]
        frames.append(between + encoded[start:end])
        head = head or bytearray(encoded[:start])  # the first frame's palette
    head[6:10] = screen[0].to_bytes(2, "little") + screen[1].to_bytes(2, "little")
    return bytes(head) + b"".join(frames) + b";"


def _shape(data):
    return tuple(int(v) for v in tf.function(image_headers.header_shape)(tf.constant(data)))


def _animation():
    """An animated GIF as Pillow writes it: NETSCAPE loop and comment extensions, a graphic
    control extension before each frame, frames of other sizes and palettes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    frames = [
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 31 - 2 * i, 3), np.uint8))
        for i in range(5)
    ]
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0,
        comment=b"c" * 600, disposal=2, optimize=False,
    )  # fmt: skip
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "one frame",
        "frames larger than the screen",
        "animation",
        "full sub-blocks",
        "extensions",
        "a frame after an empty extension",
    ],
)
def test_header_shape_counts_every_gif_frame_at_the_largest_frame_size(case):
    """(frames, largest width, largest height): what TF's decoder allocates (the decoded
    animation's shape is the oracle, with the Python walk of the blocks)."""
    data = {
        "one frame": lambda: _gif([(30, 20)]),
        "frames larger than the screen": lambda: _gif([(1, 1), (60, 2), (2, 50)]),
        "animation": _animation,
        "full sub-blocks": lambda: _gif([(1000, 700), (7, 9)], noise=True),
        # An empty comment (giflib reads a chain after it), a comment of 3 sub-blocks, a
        # graphic control extension.
        "extensions": lambda: _gif(
            [(5, 6), (8, 3)],
            between=b"!\xfe\x00\x00!\xfe\x03abc\x02de\x00!\xf9\x04\x00\x00\x00\x00\x00",
        ),
        # After an empty comment, giflib reads ";" as the length of a sub-block: the GIF
        # spec's walk would end there, before the 60 x 70 frame TF decodes.
        "a frame after an empty extension": lambda: _gif(
            [(3, 3), (60, 70)], between=b"!\xfe\x00;" + b"x" * 59 + b"\x00"
        ),
    }[case]()
    frames, end = _gif_walk(data)
    assert data[end - 1 : end + 1] == b"\x00;"  # the oracle walked the whole file
    expected = (len(frames), max(f[2] for f in frames), max(f[3] for f in frames))
    animation = tf.io.decode_image(data, expand_animations=True).shape  # [frames, H, W, 3]
    assert expected == (animation[0], animation[2], animation[1])
    assert _shape(data) == expected
    if case == "full sub-blocks":
        assert len(data) > 2 * 256 * image_headers._FULL_SKIP  # more than two steps skip


def test_header_shape_of_cut_and_malformed_gifs(monkeypatch):
    data = _gif([(3, 3), (70, 80)], screen=(10, 10))
    second = _gif_walk(data)[0][1][0]
    # Cut inside the second frame's data: TF has allocated it (its descriptor was read).
    assert _shape(data[: second + 14]) == (2, 70, 80)
    # Cut inside its descriptor: not a frame yet.
    assert _shape(data[: second + 9]) == (1, 3, 3)
    # An unknown record ends the walk, as it ends TF's.
    assert _shape(data[:second] + b"\x99" + data[second:]) == (1, 3, 3)
    assert _shape(data[:-1]) == (2, 70, 80)  # no trailer
    # Chains of full data sub-blocks around the number one step skips.
    descriptor = b",\0\0\0\0" + (9).to_bytes(2, "little") * 2 + b"\0\2"
    for full in (1, image_headers._FULL_SKIP - 1, image_headers._FULL_SKIP, 2049):
        chains = data[:-1] + descriptor + (b"\xff" + b"\1" * 255) * full + b"\0" + descriptor
        chains += b"\3abc" + b"\0;"
        assert len(_gif_walk(chains)[0]) == 4 and _gif_walk(chains)[1] == len(chains) - 1
        assert _shape(chains) == (4, 70, 80)
    # A file of tiny sub-blocks is refused after MAX_GIF_STEPS steps of the walk.
    monkeypatch.setattr(image_headers, "MAX_GIF_STEPS", 64)
    slow = data[:second] + b",\0\0\0\0\1\0\1\0\0\2" + b"\1\0" * 200 + b"\0;"
    assert _shape(slow) == (-1, 3, 3)
    assert _shape(slow[: second + 11 + 2 * 40] + b"\0;") == (2, 3, 3)
    assert image_headers.refusal((-1, 1, 1), "a.gif", 10, 0, {}) == (
        "a.gif is a GIF of more than 64 blocks (extensions, frames, short data blocks), more "
        "than is read before decoding; re-encode it"
    )


@pytest.fixture(scope="module")
def limited(runs, tmp_path_factory):
    """The finished run exported with small decode limits, and the loaded serving_bytes."""
    straight, _ = runs
    path = saved_model.export_run(
        straight.workdir,
        str(tmp_path_factory.mktemp("limited")),
        "invp",
        max_image_pixels=1000,
        max_image_frames=2,
        max_batch_size=3,
        max_request_bytes=4000,
    )
    return path, tf.saved_model.load(path).signatures["serving_bytes"]


def _refused(signature, images):
    """The message of the assertion that `signature` fails on `images`."""
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        signature(image_bytes=tf.constant(images))
    lines = str(error.value).splitlines()
    (line,) = [x for x in lines if "assertion failed: [" in x]
    return line.split("assertion failed: [", 1)[1].removesuffix("]")


def test_serving_bytes_counts_gif_frames_not_the_logical_screen(limited):
    path, serving_bytes = limited
    with open(os.path.join(path, "assets", saved_model.METADATA_FILE)) as f:
        metadata = json.load(f)
    limits = {"max_image_pixels": 1000, "max_image_frames": 2, "max_batch_size": 3}
    assert {key: metadata[key] for key in limits} == limits
    assert metadata["max_request_bytes"] == 4000
    small = tf.io.encode_png(np.zeros([20, 30, 3], np.uint8)).numpy()
    within = _gif([(1, 1), (20, 25)])  # 2 x 20 x 25 = 1000 pixels
    assert serving_bytes(image_bytes=tf.constant([small, within]))["embedding"].shape == (2, 16)
    # A 1 x 1 screen, a 40 x 40 frame: decoded, it would take 2 frames of 40 x 40.
    bomb = _gif([(1, 1), (40, 40)])
    assert _refused(serving_bytes, [small, bomb]) == (
        "image_bytes[1] decodes to 2 frame(s) of 40x40 (width x height) = 3200 pixels, above "
        "the limit of 1000 of this export (--max_image_pixels of invp_tf.export)"
    )
    # The same through the TF1 loader of TF Serving.
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        saved_model.run_signatures_tf1(
            path, {"serving_bytes": {"image_bytes": np.array([small, bomb], dtype=object)}}
        )
    assert "image_bytes[1] decodes to 2 frame(s) of 40x40 (width x height) = 3200" in str(
        error.value
    )


def test_serving_bytes_refuses_frames_batch_and_bytes_before_decoding(limited):
    _, serving_bytes = limited
    small = tf.io.encode_png(np.zeros([20, 30, 3], np.uint8)).numpy()
    assert _refused(serving_bytes, [small, _gif([(2, 2)] * 3)]) == (
        "image_bytes[1] has 3 frames, above the limit of 2 of this export (--max_image_frames "
        "of invp_tf.export)"
    )
    assert _refused(serving_bytes, [small] * 4) == (
        "image_bytes[3] is past the batch limit: the request holds 4 images, above the limit of "
        "3 of this export (--max_batch_size of invp_tf.export)"
    )
    noise = np.random.default_rng(0).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    large = tf.io.encode_png(noise).numpy()  # 2.7 KB: noise does not compress
    total = len(small) + 2 * len(large)
    assert len(small) + len(large) <= 4000 < total
    assert _refused(serving_bytes, [small, large, large]) == (
        f"image_bytes[2] brings the request to {total} bytes ({total} in all), above the limit "
        "of 4000 of this export (--max_request_bytes of invp_tf.export)"
    )
    # Every header is checked before any image is decoded: image 0 is not decodable (its
    # body is cut), image 1 is too large; the refusal of image 1 comes first.
    assert _refused(serving_bytes, [small[:40], _png_header_only(100, 100)]) == (
        "image_bytes[1] decodes to 1 frame(s) of 100x100 (width x height) = 10000 pixels, above "
        "the limit of 1000 of this export (--max_image_pixels of invp_tf.export)"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG"):
        serving_bytes(image_bytes=tf.constant([small[:40], small]))


def test_serving_default_refuses_batches_above_the_limit(limited):
    path, _ = limited
    serve = tf.saved_model.load(path).signatures["serving_default"]
    side = json.load(open(os.path.join(path, "assets", saved_model.METADATA_FILE)))["image_size"]
    assert serve(images=tf.zeros([3, side, side, 3]))["embedding"].shape[0] == 3  # at the limit
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        serve(images=tf.zeros([4, side, side, 3]))
    assert (
        "images holds 4 images, above the limit of 3 of this export (--max_batch_size of "
        "invp_tf.export)" in str(error.value)
    )


def test_folder_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        png = tf.io.encode_png(np.full((12, 12, 3), i * 10, np.uint8)).numpy()
        (folder / f"{i:02d}.png").write_bytes(png)
    # A 1 x 1 screen and 26 frames of 1400 x 1400: 51 megapixels for TF's decoder.
    bomb = folder / "13.gif"
    bomb.write_bytes(_gif([(1400, 1400)] * 26))
    line = (
        f"{bomb} decodes to 26 frame(s) of 1400x1400 (width x height) = 50960000 pixels, above "
        "the limit of 50000000 for folder datasets; downscale the file or remove it"
    )
    source = data.load_source(f"folder:{folder}")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(source.dataset())
    assert line in str(error.value)
    config = tiny_config(
        "",
        tmp_path / "run",
        dataset=f"folder:{folder}",
        num_background=16,
        knn_method="brute_force",
    )
    with pytest.raises(ValueError) as error:
        training.train_and_evaluate(config, config.workdir)
    assert str(error.value) == line
    assert not tf.train.latest_checkpoint(_checkpoints(config.workdir))
    # The file removed, the same run trains.
    bomb.unlink()
    training.train_and_evaluate(config, config.workdir)
    assert _epochs(config.workdir) == list(range(config.epochs))


def test_killed_export_leaves_a_staging_folder_that_the_next_export_removes(runs, tmp_path, caplog):
    straight, _ = runs
    models = tmp_path / "models"
    model_dir = models / "invp"
    command = [
        sys.executable, "-m", "invp_tf.export", f"--workdir={straight.workdir}",
        f"--export_dir={models}", "--model_name=invp",
    ]  # fmt: skip
    export = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        staged = []
        while not staged and export.poll() is None and time.time() < deadline:
            staged = [
                p for p in model_dir.glob(".1.tmp-*") if (p / saved_model.METADATA_FILE).exists()
            ]
            time.sleep(0.01)
    finally:
        export.kill()
        export.wait()
    assert len(staged) == 1 and staged[0].exists() and not (model_dir / "1").exists()
    with caplog.at_level(logging.WARNING):
        path = saved_model.export_run(straight.workdir, str(models), "invp")
    assert path == str(model_dir / "1")
    assert [r.getMessage() for r in caplog.records if "Removing" in r.getMessage()] == [
        f"Removing {staged[0]}, left by an export that did not finish."
    ]
    assert os.listdir(model_dir) == ["1"]


def test_staging_folders_of_exports_that_may_still_run_are_kept(tmp_path, caplog):
    # This process's, and a recent one of another host, are kept; an old one of another host
    # and one named by an older version (no writer in the name) are removed.
    live = tmp_path / f".2.tmp-{saved_model._host_tag()}-{os.getpid()}-0badf00d"
    other = tmp_path / ".3.tmp-00000000-1-0badf00d"
    old = tmp_path / ".4.tmp-00000000-2-0badf00d"
    legacy = tmp_path / ".5.tmp-0123456789ab"
    version = tmp_path / "1"
    for folder in (live, other, old, legacy, version):
        folder.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    with caplog.at_level(logging.WARNING):
        saved_model.remove_leftovers(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"Removing {folder}, left by an export that did not finish." for folder in (old, legacy)
    ]
    assert sorted(os.listdir(tmp_path)) == sorted(["1", live.name, other.name])


def test_export_holds_no_local_path(runs, tmp_path):
    straight, _ = runs
    run_root = os.path.dirname(straight.workdir)  # the run and its data_dir are in it
    assert straight.data_dir.startswith(run_root)
    path = saved_model.export_run(straight.workdir, str(tmp_path / "models"), "invp")
    local = [run_root, str(tmp_path), os.path.realpath(run_root), os.path.realpath(tmp_path)]
    files = [os.path.join(p, f) for p, _, names in os.walk(path) for f in names]
    assert {"saved_model.pb", "flags.txt", saved_model.METADATA_FILE} <= {
        os.path.basename(f) for f in files
    }
    for name in files:
        with open(name, "rb") as f:
            content = f.read()
        for folder in local:
            assert folder.encode() not in content, (name, folder)
    with open(os.path.join(path, "assets", saved_model.METADATA_FILE)) as f:
        assert json.load(f)["workdir"] == "straight"
    with open(os.path.join(path, "assets", "flags.txt")) as f:
        flags = f.read().splitlines()
    assert "--workdir=straight" in flags and "--data_dir=idx" in flags
    with open(os.path.join(path, "README.md")) as f:
        assert "in the run `straight`" in f.read()
    flags = "--workdir=/home/a/runs/x\n--dataset=folder:/home/a/photos/\n--data_dir=rel/d\n--nobf\n"
    assert saved_model.portable_flags(flags, "x").splitlines()[1:] == [
        "--workdir=x",
        "--dataset=folder:photos",
        "--data_dir=rel/d",
        "--nobf",
    ]


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
