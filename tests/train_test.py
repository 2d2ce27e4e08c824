"""End-to-end training on a tiny IDX dataset: artifacts, exact resume, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from invp_tf import config as config_lib
from invp_tf import data
from invp_tf import evaluation
from invp_tf import neighbors
from invp_tf import train
from invp_tf import training
from invp_tf import workdir as workdir_lib
from tests import conftest
from tests.conftest import tiny_config
from tests.conftest import write_idx_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restored_state(workdir):
    """(encoder weights, bank, graph) of the latest checkpoint in `workdir`."""
    run = workdir_lib.load_run(str(workdir))
    return [w.numpy() for w in run.encoder.weights], run.bank, run.knn_graph


def _assert_same_state(workdir_a, workdir_b):
    """Both runs ended with the same encoder weights, bank and graph."""
    weights_a, bank_a, graph_a = _restored_state(workdir_a)
    weights_b, bank_b, graph_b = _restored_state(workdir_b)
    np.testing.assert_allclose(bank_b, bank_a, atol=1e-6)
    np.testing.assert_array_equal(graph_b, graph_a)
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_artifacts(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run")
    last = training.train_and_evaluate(config, config.workdir)
    rows = _rows(config.workdir)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("loss_ins", "loss_inv", "knn_top1", "graph_seconds", "images_per_second"):
        assert key in rows[0]
    assert rows[0]["loss_inv"] is None and rows[2]["loss_inv"] is not None  # ramp-up
    # The graph is built and monitored in every epoch, the ramp-up's included.
    for row in rows:
        assert row["graph_seconds"] >= 0
        assert row["graph_recall"] == pytest.approx(1.0, abs=0.02)  # brute force is exact
        for key in ("purity_neighbors", "purity_hard"):
            assert 0.0 <= row[key] <= 1.0
        assert 1.0 <= row["mean_positives"] <= 2 + 4  # k + k^2 with k = 2
        assert "purity_neighbors_bank_graph" not in row  # only with --graph_features=fresh
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in rows)
    assert last == rows[-1]
    assert tf.train.latest_checkpoint(os.path.join(config.workdir, "checkpoints")).endswith("-3")
    assert tf.io.gfile.glob(os.path.join(config.workdir, "tensorboard", "events.out.*"))
    # The checkpointed graph is the kNN graph of the bank as it was before the
    # last epoch; here: its rows are valid, self-free neighbour lists.
    _, bank, graph = _restored_state(config.workdir)
    assert workdir_lib.load_run(config.workdir).epoch == 3
    assert graph.shape == (64, 2) and not np.any(graph == np.arange(64)[:, None])
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)


def test_instance_only_run_monitors_a_graph_its_loss_never_reads(
    tiny_idx_dir, tmp_path, monkeypatch
):
    config = tiny_config(tiny_idx_dir, tmp_path / "monitored", lambda_inv=0.0, epochs=2)
    training.train_and_evaluate(config, config.workdir)
    rows = _rows(config.workdir)
    assert all(r["loss_inv"] is None and 0 <= r["purity_neighbors"] <= 1 for r in rows)
    # The same run with a graph of zeros trains to the same state: the loss ignores it.
    zeros = lambda bank, k, method: np.zeros((len(bank), k), np.int32)  # noqa: E731
    monkeypatch.setattr(neighbors, "build_knn_graph", zeros)
    blind = dataclasses.replace(config, workdir=str(tmp_path / "blind"))
    training.train_and_evaluate(blind, blind.workdir)
    weights_a, bank_a, _ = _restored_state(config.workdir)
    weights_b, bank_b, _ = _restored_state(blind.workdir)
    np.testing.assert_array_equal(bank_b, bank_a)
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_array_equal(b, a)


def test_graph_from_fresh_features(tiny_idx_dir, tmp_path):

    config = tiny_config(tiny_idx_dir, tmp_path / "fresh", graph_features="fresh", epochs=2)
    training.train_and_evaluate(config, config.workdir)
    rows = _rows(config.workdir)
    for row in rows:  # both graphs' purity on the same epoch
        assert 0 <= row["purity_neighbors"] <= 1 and 0 <= row["purity_neighbors_bank_graph"] <= 1
    # The checkpointed graph (built before the last epoch) is the exact kNN graph of the
    # encoder's embeddings as they were then: rebuild that state and compare.
    run = workdir_lib.load_run(config.workdir)
    source = data.load_source("fashion_mnist", "train", config.data_dir)
    previous = tf.train.Checkpoint(encoder=run.encoder)
    path = os.path.join(config.workdir, "checkpoints", "ckpt-1")
    previous.restore(path).expect_partial()
    infer = evaluation.inference_function(run.encoder)
    steps = tf.Variable(0, dtype=tf.int64)
    embeddings = evaluation.FreshEmbeddings(infer, source, config, steps)()
    want = neighbors.build_knn_graph(embeddings, config.num_neighbors, "brute_force")
    np.testing.assert_array_equal(run.knn_graph, want)
    assert not np.array_equal(run.knn_graph, neighbors.build_knn_graph(run.bank, 2, "brute_force"))


def test_workdir_on_another_file_system(tiny_idx_dir, tmp_path):
    """Every workdir path goes through tf.io.gfile (gs://, s3://...); TF's in-memory ram://
    file system stands in for them here."""
    workdir = f"ram://train_test/{tmp_path.name}/run"
    config = tiny_config(tiny_idx_dir, workdir, epochs=1)
    row = training.train_and_evaluate(config, workdir)
    assert sorted(tf.io.gfile.listdir(workdir)) == [
        "checkpoints", "flags.txt", "flags_history.txt", "metrics.jsonl", "tensorboard"
    ]  # fmt: skip
    with tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == [row]
    assert config_lib.Config.from_flagfile(os.path.join(workdir, "flags.txt")) == config
    assert tf.io.gfile.glob(os.path.join(workdir, "tensorboard", "events.out.*"))
    assert training.finished_message(workdir, 1).startswith(f"{workdir} is finished: 1/1 epochs")
    assert not os.path.exists("ram:")  # nothing went to a local folder named after the scheme


def test_interrupted_run_resumes_exactly(tiny_idx_dir, tmp_path):
    straight = tiny_config(tiny_idx_dir, tmp_path / "straight")
    training.train_and_evaluate(straight, straight.workdir)

    resumed = tiny_config(tiny_idx_dir, tmp_path / "resumed")
    with pytest.raises(conftest.Interrupt):
        # Dies during epoch 1 (after the graph was first built for it).
        training.train_and_evaluate(
            resumed, resumed.workdir, callbacks=[conftest.InterruptAt(1, 1)]
        )
    assert [r["epoch"] for r in _rows(resumed.workdir)] == [0]
    training.train_and_evaluate(resumed, resumed.workdir)

    _assert_same_state(straight.workdir, resumed.workdir)
    losses_a = [r["loss"] for r in _rows(straight.workdir)]
    losses_b = [r["loss"] for r in _rows(resumed.workdir)]
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)


class _PoisonWeightsAt(keras.callbacks.Callback):
    """Sets the memory bank to NaN when the given epoch starts (a run that diverges there)."""

    def __init__(self, epoch):
        super().__init__()
        self.fits, self.epoch = 0, epoch

    def on_train_begin(self, logs=None):
        self.fits += 1
        if self.fits - 1 == self.epoch:
            bank = self.model.memory_bank.bank
            bank.assign(np.full(bank.shape, np.nan, np.float32))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", epochs=2)
    with pytest.raises(training.TrainingError, match="loss became nan.*epoch 1.*ckpt-1"):
        training.train_and_evaluate(config, config.workdir, callbacks=[_PoisonWeightsAt(1)])
    checkpoints = os.path.join(config.workdir, "checkpoints")
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-1")
    assert [r["epoch"] for r in _rows(config.workdir)] == [0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(dataset="imagenet"), "imagenet"),
        (dict(num_background=65), "--num_background=65 exceeds the 64 training images"),
        (dict(num_neighbors=64), "--num_neighbors=64 must be in"),
        (dict(head="deep"), "--head=deep is not one of"),
        (dict(batch_size=100), "--batch_size=100"),
        (dict(batch_size=0), "--batch_size=0"),
        (dict(eval_every=0), "--eval_every=0"),
        (dict(num_background=0), "--num_background=0"),
        (dict(crop_scale=0.0), "--crop_scale=0.0"),
        (dict(lr_decay_epochs="1;2"), "--lr_decay_epochs=1;2"),
        (dict(positive_mode="knn", num_knn_positives=40), "--num_knn_positives=40 needs"),
    ],
)
def test_bad_flags_are_named(tiny_idx_dir, tmp_path, overrides, message):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", **overrides)
    with pytest.raises(ValueError, match=message):
        training.train_and_evaluate(config, config.workdir)


def test_missing_data_dir(tmp_path):
    config = tiny_config(tmp_path / "absent", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="absent"):
        training.train_and_evaluate(config, config.workdir)


def test_empty_and_unreadable_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny_config("", tmp_path / "run", dataset=f"folder:{empty}")
    with pytest.raises(ValueError, match="empty"):
        training.train_and_evaluate(config, config.workdir)

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        png = tf.io.encode_png(np.full((12, 12, 3), i * 10, np.uint8)).numpy()
        # One file has a valid PNG signature but a truncated body: only decoding
        # can find it, so the trainer must name it when the pipeline fails.
        (folder / f"{i:02d}.png").write_bytes(png[:20] if i == 7 else png)
    config = tiny_config(
        "",
        tmp_path / "run2",
        dataset=f"folder:{folder}",
        num_background=16,
        knn_method="brute_force",
    )
    with pytest.raises(ValueError, match="unreadable image: .*07.png"):
        training.train_and_evaluate(config, config.workdir)


def test_flagfile_round_trip(tmp_path):
    config = tiny_config("/data", tmp_path / "run", hard_positives=False, background="exact")
    path = tmp_path / "flags.txt"
    path.write_text("\n".join(config.flagfile_lines()) + "\n")
    try:
        flags.FLAGS([sys.argv[0], f"--flagfile={path}"])
        assert train.config_from_flags() == config
    finally:
        flags.FLAGS.unparse_flags()


def test_cli_error_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipe's path is relative to the repo root
    with pytest.raises(SystemExit) as stopped:
        train.main(
            [
                "invp-train",
                "--flagfile=configs/fashion_mnist.flags",
                f"--workdir={tmp_path}/run",
                "--dataset=nonsense",
            ]
        )
    assert stopped.value.code == 1
    stderr = capsys.readouterr().err
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("invp_tf.train: error: unknown dataset 'nonsense'; valid forms")
    assert "Traceback" not in stderr
    # Nothing is written before the flags are checked: no half-made run is left.
    assert not (tmp_path / "run").exists()


def _main(argv, monkeypatch):
    """Runs train.main in this process as `python -m invp_tf.train ARGV` would."""
    monkeypatch.setattr(sys, "argv", ["invp_tf/train.py", *argv])
    try:
        flags.FLAGS(sys.argv)
        train.main(["invp_tf/train.py"])
    finally:
        flags.FLAGS.unparse_flags()


def test_no_flagfile_stops_with_one_line_naming_the_recipes(tmp_path, monkeypatch, capsys):
    # The defaults are the ImageNet recipe: without a recipe nothing may start training.
    with pytest.raises(SystemExit) as stopped:
        _main([f"--workdir={tmp_path}/run", "--epochs=2"], monkeypatch)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"invp_tf.train: error: {train.NO_FLAGFILE}"
    assert "--flagfile=configs/fashion_mnist.flags" in err and "configs/r50.flags" in err
    assert not (tmp_path / "run").exists()


def test_rerun_of_a_finished_run_says_so_in_one_line(
    tiny_idx_dir, tmp_path, monkeypatch, capsys, caplog
):
    """Also: progress lines "epoch e/E" with the boundary steps' seconds and an ETA, and
    per-step loss and learning rate in TensorBoard."""
    config = tiny_config(tiny_idx_dir, tmp_path / "run", epochs=2)
    with caplog.at_level("INFO", logger="absl"):
        training.train_and_evaluate(config, config.workdir)
    logs = [record.getMessage() for record in caplog.records]
    for line in [
        "epoch 1/2: training 4 steps ...",
        "epoch 2/2: kNN graph took",
        "epoch 2/2: kNN monitor took",
        "epoch 2/2: checkpoint took",
        "epoch 2/2 done: loss",
    ]:
        assert any(message.startswith(line) for message in logs), line
    assert any("ETA" in message for message in logs if message.startswith("epoch 1/2 done"))
    scalars = {}
    for path in tf.io.gfile.glob(os.path.join(config.workdir, "tensorboard", "events.out.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(event.step)
    assert scalars["step/loss"] == scalars["step/learning_rate"] == list(range(1, 9))  # 4 steps
    assert scalars["loss"] == [1, 2]  # the per-epoch scalars stay

    rows = _rows(config.workdir)
    assert training.train_and_evaluate(config, config.workdir) == rows[-1]  # not {}
    capsys.readouterr()
    _main([f"--flagfile={config.workdir}/flags.txt"], monkeypatch)
    out = capsys.readouterr().out.strip().splitlines()
    checkpoint = os.path.join(config.workdir, "checkpoints", "ckpt-2")
    assert out == [
        f"{config.workdir} is finished: 2/2 epochs trained, checkpoint {checkpoint}; next: "
        f"python -m invp_tf.evaluate --workdir={config.workdir} --protocol=knn (or linear, semi), "
        f"python -m invp_tf.export --workdir={config.workdir} --export_dir=exported"
    ]
    assert _rows(config.workdir) == rows
    assert training.finished_message(config.workdir, 3) is None  # more epochs asked: not finished


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_exactly(tmp_path):
    """The real thing: SIGKILL the CLI mid-run, rerun the same command, compare."""

    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    write_idx_dataset(data_dir, num_train=64 * 8, num_test=24, height=12, width=12)

    def command(workdir):
        config = tiny_config(data_dir, workdir, epochs=3, num_background=128)
        flagfile = tmp_path / f"{os.path.basename(workdir)}.flags"
        flagfile.write_text("\n".join(config.flagfile_lines()) + "\n")
        return [sys.executable, "-m", "invp_tf.train", f"--flagfile={flagfile}"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), cwd=REPO, check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(
        command(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "ckpt-1.index").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "ckpt-3.index").exists(), "finished before the kill"
    subprocess.run(command(killed), cwd=REPO, check=True, capture_output=True, timeout=600)

    _assert_same_state(straight, killed)
    assert [r["epoch"] for r in _rows(killed)] == [0, 1, 2]


def test_config_from_flagfile_without_absl(tmp_path):
    config = tiny_config("/data", tmp_path / "run", hard_negatives=False, background="exact")
    path = tmp_path / "flags.txt"
    path.write_text("\n".join(config.flagfile_lines()) + "\n")
    assert config_lib.Config.from_flagfile(str(path)) == config
    path.write_text("--bogus=1\n")
    with pytest.raises(ValueError, match="unknown flag --bogus"):
        config_lib.Config.from_flagfile(str(path))


def test_load_run_refuses_a_directory_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no flags.txt"):
        workdir_lib.load_run(str(tmp_path))
    (tmp_path / "flags.txt").write_text("--epochs=1\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        workdir_lib.load_run(str(tmp_path))


class _StopAt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            self.model.stop_training = True


def test_epoch_stopped_by_a_callback_is_not_saved(tiny_idx_dir, tmp_path):
    config = tiny_config(tiny_idx_dir, tmp_path / "run", epochs=1)
    with pytest.raises(training.TrainingError, match="epoch 0 stopped after 2 of 4 steps"):
        training.train_and_evaluate(config, config.workdir, callbacks=[_StopAt()])
    assert tf.train.latest_checkpoint(os.path.join(config.workdir, "checkpoints")) is None


def test_background_search_flag_reaches_the_loss(tiny_idx_dir, tmp_path):
    # M=32 of 64 rows: the sampled TopM differs from the exact one, so the losses differ.
    rows = {}
    for mode in ("exact", "sampled"):
        config = tiny_config(tiny_idx_dir, tmp_path / mode, epochs=2, background_search=mode)
        rows[mode] = training.train_and_evaluate(config, config.workdir)
    assert rows["exact"]["loss_inv"] != rows["sampled"]["loss_inv"]
    assert abs(rows["exact"]["loss_inv"] - rows["sampled"]["loss_inv"]) < 0.5


def test_checkpoint_without_step_counter_resumes(tiny_idx_dir, tmp_path, monkeypatch):
    """Runs checkpointed before `step` was saved (older versions) resume exactly."""
    straight = tiny_config(tiny_idx_dir, tmp_path / "straight", epochs=2)
    training.train_and_evaluate(straight, straight.workdir)
    legacy = tiny_config(tiny_idx_dir, tmp_path / "legacy", epochs=2)
    checkpoint = tf.train.Checkpoint

    def without_step(step=None, **parts):  # the checkpoint layout of older versions
        return checkpoint(**parts)

    with monkeypatch.context() as patch, pytest.raises(conftest.Interrupt):
        patch.setattr(tf.train, "Checkpoint", without_step)
        training.train_and_evaluate(legacy, legacy.workdir, callbacks=[conftest.InterruptAt(1, 1)])
    saved = tf.train.list_variables(str(tmp_path / "legacy" / "checkpoints" / "ckpt-1"))
    assert not any(name.startswith("step/") for name, _ in saved)
    training.train_and_evaluate(legacy, legacy.workdir)
    _assert_same_state(straight.workdir, legacy.workdir)
