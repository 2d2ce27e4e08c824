"""invp_tf.evaluate end to end on one tiny trained run: every protocol, splits, bad input."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from invp_tf import data
from invp_tf import evaluate
from invp_tf import evaluation
from invp_tf import input_pipeline
from invp_tf import protocols
from invp_tf import workdir as workdir_lib


def _oracle_knn_top1(run, block, k, temperature):
    """Fresh features through eval_pipeline + the encoder, then a NumPy weighted kNN."""
    out = {}
    for split in ("train", "test"):
        source = data.load_source("fashion_mnist", split, run.config.data_dir)
        feats, labels = [], []
        for images, _, label in input_pipeline.eval_pipeline(source, batch_size=7, image_size=12):
            result = run.encoder(images, training=False)
            feats.append(result["embedding" if block == "embedding" else "features"].numpy())
            labels.append(label.numpy())
        out[split] = np.concatenate(feats), np.concatenate(labels)
    (train_x, train_y), (test_x, test_y) = out["train"], out["test"]
    train_x /= np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x /= np.linalg.norm(test_x, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test_x, test_y, strict=True):
        sims = train_x @ row
        top = np.argsort(-sims, kind="stable")[:k]
        votes = np.bincount(train_y[top], np.exp(sims[top] / temperature), minlength=3)
        correct += np.argmax(votes) == label
    return correct / len(test_y)


def test_knn_protocol_matches_numpy_oracle(tiny_run, tmp_path):
    settings = protocols.make_settings(
        tiny_run.workdir, "knn", block="embedding,stage4", knn_k=5, output=str(tmp_path / "k.json")
    )
    report = protocols.evaluate(settings)
    run = workdir_lib.load_run(tiny_run.workdir)
    for block in ("embedding", "stage4"):
        want = _oracle_knn_top1(run, block, 5, 0.07)
        assert report["results"][block]["top1"] == pytest.approx(want, abs=1e-9)
    assert report["checkpoint_epoch"] == 2
    assert report["train_split"] == {"examples": 64, "labelled_used": 64}
    assert report["eval_split"] == {"name": "test", "examples": 24}
    assert set(report["baselines"]) == {"pixel_knn", "pixel_knn_tuned_k", "random_init_knn"}
    assert report["baselines"]["pixel_knn_tuned_k"]["k"] in evaluation.KNN_K_VALUES
    assert json.loads((tmp_path / "k.json").read_text())["results"] == report["results"]
    assert "baseline pixel_knn" in protocols.format_table(report)


def test_linear_protocol_probes_every_block(tiny_run, tmp_path):
    settings = protocols.make_settings(
        tiny_run.workdir,
        "linear",
        linear_solver="sgd",
        epochs=3,
        batch_size=16,
        output=str(tmp_path / "l.json"),
    )
    report = protocols.evaluate(settings)
    assert list(report["results"]) == list(evaluation.BLOCKS)
    for r in report["results"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 1 and np.isfinite(r["train_loss"])
    # SGD probes score no held-out part, so no block is chosen (never on test).
    assert report["best"] is None
    assert set(report["baselines"]) == {
        "pixel_knn",
        "pixel_knn_tuned_k",
        "pixel_logistic_regression",
        "random_init_knn",
        "random_init_logistic_regression",
    }
    assert report["baselines"]["pixel_logistic_regression"]["converged"]
    # The toy classes are bright bars: a pixel logistic regression separates them.
    assert report["baselines"]["pixel_logistic_regression"]["top1"] > 0.9
    assert tf.io.gfile.glob(os.path.join(tiny_run.workdir, "eval/tensorboard/linear/*"))


def test_semi_protocol_fine_tunes_on_a_balanced_label_subset(tiny_run, tmp_path):
    settings = protocols.make_settings(
        tiny_run.workdir,
        "semi",
        label_fraction=0.25,
        epochs=2,
        batch_size=8,
        output=str(tmp_path / "s.json"),
    )
    report = protocols.evaluate(settings)
    labels = data.labels_by_index(data.load_source("fashion_mnist", "train", tiny_run.data_dir))
    want = sum(max(1, round(0.25 * n)) for n in np.bincount(labels))
    assert report["train_split"]["labelled_used"] == want
    assert report["eval_split"] == {"name": "test", "examples": 24}
    network = report["results"]["network"]
    assert 0 <= network["top1"] <= 1 and np.isfinite(network["train_loss"])
    assert set(report["baselines"]) == {
        "frozen_embedding_knn",
        "pixel_knn",
        "pixel_knn_tuned_k",
        "pixel_logistic_regression",
        "random_init_knn",
        "random_init_logistic_regression",
        "random_init_network",
    }
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["label_fraction"] == 0.25


def test_semi_chooses_its_learning_rate_on_held_out_train_rows(tiny_run, tmp_path):
    settings = protocols.make_settings(
        tiny_run.workdir,
        "semi",
        label_fraction=0.25,
        epochs=1,
        batch_size=8,
        learning_rates="0.01,0.2",
        output=str(tmp_path / "s.json"),
    )
    report = protocols.evaluate(settings)
    for r in (report["results"]["network"], report["baselines"]["random_init_network"]):
        assert set(r["held_out_top1"]) == {"0.01", "0.2"}
        chosen = max(r["held_out_top1"], key=r["held_out_top1"].get)
        assert r["learning_rate"] == float(chosen)
        assert 0 <= r["top1"] <= r["top5"] <= 1
    assert report["best"]["chosen_on"] == "held-out"


def _image_folder(root, per_class=12):
    """folder:ROOT with class subfolders and no test split."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 50, (16, 16, 3)).astype(np.uint8)
            image[4 * c : 4 * c + 6] += 150
            png = tf.io.encode_png(image).numpy()
            (root / name / f"{i:03d}.png").write_bytes(png)
    return root


def test_finetune_transfers_to_a_folder_and_holds_out_a_disjoint_split(tiny_run, tmp_path):
    folder = _image_folder(tmp_path / "shapes")
    splits = protocols.Splits(
        f"folder:{folder}", None, train_examples=0, label_fraction=1.0, held_out=0.25, seed=0
    )
    assert splits.test_name == "held-out"
    assert not set(splits.train_rows) & set(splits.test_rows)
    assert len(splits.train_rows) + len(splits.test_rows) == 24
    np.testing.assert_array_equal(np.bincount(splits.train_labels[splits.test_rows]), [3, 3])
    settings = protocols.make_settings(
        tiny_run.workdir,
        "finetune",
        dataset=f"folder:{folder}",
        held_out_fraction=0.25,
        epochs=1,
        batch_size=6,
        baselines=False,
        output=str(tmp_path / "f.json"),
    )
    report = protocols.evaluate(settings)
    assert report["eval_split"] == {"name": "held-out", "examples": 6}
    assert report["train_split"]["labelled_used"] == 18
    assert 0 <= report["results"]["network"]["top1"] <= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(protocol="linear", block="stage9"), "--block=stage9: no block named 'stage9'"),
        (dict(protocol="knn", block="embedding,,conv1"), "no block named 'conv1'"),
        (dict(protocol="semi", label_fraction=0.0), r"--label_fraction=0.0 must be in \(0, 1\]"),
        (dict(protocol="semi", label_fraction=1.5), r"--label_fraction=1.5 must be in \(0, 1\]"),
        (dict(protocol="semi", block="stage4"), "--block applies to knn and linear"),
        (dict(protocol="knn", knn_k=0), "--knn_k=0 must be >= 1"),
        (dict(protocol="linear", linear_solver="adam"), "--linear_solver=adam is not one of"),
    ],
)
def test_bad_settings_are_named(tmp_path, overrides, message):
    protocol = overrides.pop("protocol")
    with pytest.raises(protocols.EvaluationError, match=message):
        protocols.evaluate(protocols.make_settings(str(tmp_path), protocol, **overrides))


def test_workdir_without_checkpoint_is_refused(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run: no flags.txt"):
        protocols.evaluate(protocols.make_settings(str(tmp_path), "knn"))
    (tmp_path / "flags.txt").write_text((open(os.path.join(tiny_run.workdir, "flags.txt")).read()))
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        protocols.evaluate(protocols.make_settings(str(tmp_path), "knn"))


def test_cli_error_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["invp-evaluate", f"--workdir={tmp_path}", "--block=conv9"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "invp_tf.evaluate: error: --block=conv9: no block named 'conv9'; valid blocks: "
        "stem, stage1, stage2, stage3, stage4, embedding or 'all'"
    )


def test_default_output_in_the_run_folder_is_checked_before_any_work(tmp_path, capsys):
    # RUN/eval is a file: the default --output RUN/eval/knn.json cannot be written. The line
    # comes before the run is read (this folder has no checkpoint, which would be named next).
    (tmp_path / "flags.txt").write_text("--dataset=fashion_mnist\n")
    (tmp_path / "eval").write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["invp-evaluate", f"--workdir={tmp_path}", "--protocol=knn"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"invp_tf.evaluate: error: --output={tmp_path}/eval/knn.json cannot be created: "
        f"{tmp_path}/eval is a file"
    )


def test_deprecated_spellings_still_work_and_warn_once(caplog):
    argv = ["invp-evaluate", "--workdir=w", "--temperature=0.5", "--k=7"]
    with caplog.at_level(logging.WARNING):
        values = evaluate._COMMAND.values(argv)
        again = evaluate._COMMAND.values(argv)
    assert (values["knn_temperature"], values["knn_k"]) == (0.5, 7) and again == values
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == [
        "--temperature is deprecated and goes in the next release: use --knn_temperature",
        "--k is deprecated and goes in the next release: use --knn_k",
    ]
