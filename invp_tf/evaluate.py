"""Evaluate a trained run: weighted kNN, per-block linear probe, semi-supervised, transfer.

    python -m invp_tf.evaluate --workdir=runs/demo --protocol=knn
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=linear            # all blocks
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=semi --label_fraction=0.01
    python -m invp_tf.evaluate --workdir=runs/demo --protocol=finetune --dataset=mnist

The encoder is rebuilt from the run's flags.txt and its latest checkpoint. Every protocol
prints a table with raw-pixel baselines on the same split beside the result (weighted kNN
and logistic regression on pixels), writes a JSON result (--output, default
WORKDIR/eval/PROTOCOL.json) and TensorBoard scalars (WORKDIR/eval/tensorboard/PROTOCOL).
"""

import datetime
import functools
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from invp_tf import augment
from invp_tf import command
from invp_tf import data
from invp_tf import evaluation
from invp_tf import workdir as workdir_lib

PROTOCOLS = ("knn", "linear", "semi", "finetune")
LINEAR_SOLVERS = ("lbfgs", "sgd")
# The random-initialised encoder's block read by the baselines: the pooled backbone, the
# features a user transfers.
RANDOM_INIT_BLOCK = "stage4"
RANDOM_INIT_KEY = "random_init/" + RANDOM_INIT_BLOCK
# Deprecated spellings kept as flag aliases: the same names as invp_tf.train's monitor.
_FLAG_ALIASES = {"k": "knn_k", "temperature": "knn_temperature"}
# Protocol defaults of the flags left unset (None).
_DEFAULTS = {
    "knn": dict(block="embedding", label_fraction=1.0, batch_size=256),
    "linear": dict(
        block="all",
        label_fraction=1.0,
        epochs=100,
        batch_size=256,
        learning_rate=0.1,
        weight_decay=0.0,
    ),
    "semi": dict(
        label_fraction=0.01, epochs=30, batch_size=64, learning_rate=0.05, weight_decay=1e-4
    ),
    "finetune": dict(
        label_fraction=1.0, epochs=30, batch_size=64, learning_rate=0.05, weight_decay=1e-4
    ),
}
# tfds' ImageNet label subsets are already the labelled fraction.
_TFDS_LABEL_SUBSETS = ("tfds:imagenet2012_subset",)

# name -> (absl DEFINE function name, default, help): the flags of this command, in its own
# FlagValues for in-process calls (see `command.parsed`) and in absl's FLAGS when it runs as the
# program (run()); make_settings uses the same defaults.
FLAG_SPECS = {
    "workdir": ("string", None, "Training run to evaluate (flags.txt + checkpoints/)."),
    "checkpoint": (
        "string",
        None,
        "Checkpoint to evaluate (ckpt-N in the run's checkpoints/, or a path); default: the "
        "newest readable one (a corrupt newest one is skipped with a warning).",
    ),
    "protocol": ("enum", "knn", "Evaluation protocol: " + ", ".join(PROTOCOLS) + "."),
    "dataset": (
        "string",
        None,
        "Dataset to evaluate on (fashion_mnist, mnist, tfds:NAME, folder:/path); default: the "
        "run's. finetune transfers to it.",
    ),
    "data_dir": (
        "string",
        None,
        "Data folder of --dataset; default: the run's when the dataset is the run's.",
    ),
    "train_examples": (
        "integer",
        0,
        "Use only the first n train examples (0 = the whole train split).",
    ),
    "label_fraction": (
        "float",
        None,
        "Fraction of train labels used, class-balanced, drawn with --seed; in (0, 1]. "
        "Default: 0.01 for semi, 1 otherwise.",
    ),
    "block": (
        "string",
        None,
        "knn/linear: block(s) to read, comma-separated, or 'all'; of "
        f"{', '.join(evaluation.BLOCKS)}. Default: embedding for knn, all for linear.",
    ),
    "epochs": ("integer", None, "Training epochs (linear 100, semi 30, finetune 30 by default)."),
    "batch_size": ("integer", None, "Batch size (knn/linear 256, semi/finetune 64 by default)."),
    "learning_rate": (
        "float",
        None,
        "Initial SGD learning rate (linear 0.1, semi/finetune 0.05 by default).",
    ),
    "weight_decay": ("float", None, "Weight decay (linear 0, semi/finetune 1e-4 by default)."),
    "knn_k": ("integer", 200, "Neighbours of the weighted kNN classifier (alias --k)."),
    "knn_temperature": (
        "float",
        0.07,
        "Vote temperature of the weighted kNN (alias --temperature).",
    ),
    "linear_solver": (
        "string",
        "lbfgs",
        "linear: lbfgs (logistic regression fitted to convergence, scikit-learn, C chosen on a "
        "held-out part of train; for up to a few 100k rows) or sgd (the paper's SGD probe, "
        "--epochs/--learning_rate/--weight_decay; for ImageNet-size feature sets).",
    ),
    "crop_scale": (
        "float",
        None,
        "semi/finetune: min area of the random crops; default: the run's --crop_scale.",
    ),
    "held_out_fraction": (
        "float",
        0.1,
        "When the dataset has no test split: the class-balanced fraction of train held out for "
        "evaluation (never trained on).",
    ),
    "baselines": (
        "bool",
        True,
        "Also compute the raw-pixel kNN and logistic regression baselines.",
    ),
    "seed": ("integer", 0, "Seed of the label subset, shuffles and crops."),
    "output": ("string", None, "JSON result file; default WORKDIR/eval/PROTOCOL.json."),
}


def _define_flags(flag_values):
    """Defines the flags of FLAG_SPECS (and the aliases --k, --temperature) in `flag_values`."""
    holders = {}
    for name, (kind, default, help_text) in FLAG_SPECS.items():
        if kind == "enum":
            holders[name] = flags.DEFINE_enum(
                name, default, PROTOCOLS, help_text, flag_values=flag_values
            )
        else:
            define = getattr(flags, f"DEFINE_{kind}")
            holders[name] = define(name, default, help_text, flag_values=flag_values)
    for alias, name in _FLAG_ALIASES.items():
        flags.DEFINE_alias(alias, name, flag_values=flag_values)
    return holders


_FLAG_VALUES = flags.FlagValues()  # in-process calls; run() uses absl's FLAGS
_FLAGS = _define_flags(_FLAG_VALUES)


class EvaluationError(ValueError):
    """Bad input to an evaluation, with a message naming the flag, file or value."""


def make_settings(workdir, protocol, **overrides):
    """The settings of one evaluation: flag defaults, then `overrides`, then protocol defaults.

    Raises:
      EvaluationError: unknown protocol or setting name.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"--protocol={protocol}: valid protocols: {', '.join(PROTOCOLS)}")
    settings = {name: spec[1] for name, spec in FLAG_SPECS.items()}
    unknown = set(overrides) - set(settings)
    if unknown:
        raise EvaluationError(f"unknown evaluation setting(s): {sorted(unknown)}")
    settings.update(overrides, workdir=workdir, protocol=protocol)
    if str(settings["dataset"] or "").startswith(_TFDS_LABEL_SUBSETS):
        settings.setdefault("label_fraction", None)
        if settings["label_fraction"] is None:
            settings["label_fraction"] = 1.0
    for name, value in _DEFAULTS[protocol].items():
        if settings[name] is None:
            settings[name] = value
    return settings


def parse_blocks(block):
    """'all' or 'a,b' -> tuple of block names; raises EvaluationError naming a bad one."""
    if block == "all":
        return evaluation.BLOCKS
    names = tuple(b.strip() for b in block.split(",") if b.strip())
    for name in names or ("",):
        if name not in evaluation.BLOCKS:
            raise EvaluationError(
                f"--block={block}: no block named {name!r}; valid blocks: "
                f"{', '.join(evaluation.BLOCKS)} or 'all'"
            )
    return names


def check_settings(s):
    """Raises EvaluationError for the first bad flag value (before any work is done)."""
    if not s["workdir"]:
        raise EvaluationError("--workdir is required")
    checks = [
        (
            s["label_fraction"] is not None and 0 < s["label_fraction"] <= 1,
            f"--label_fraction={s['label_fraction']} must be in (0, 1]",
        ),
        (
            0 < s["held_out_fraction"] < 1,
            f"--held_out_fraction={s['held_out_fraction']} must be in (0, 1)",
        ),
        (s["knn_k"] >= 1, f"--knn_k={s['knn_k']} must be >= 1"),
        (
            s["knn_temperature"] > 0,
            f"--knn_temperature={s['knn_temperature']} must be > 0",
        ),
        (
            s["linear_solver"] in LINEAR_SOLVERS,
            f"--linear_solver={s['linear_solver']} is not one of {', '.join(LINEAR_SOLVERS)}",
        ),
        (s["batch_size"] >= 1, f"--batch_size={s['batch_size']} must be >= 1"),
        (s["train_examples"] >= 0, f"--train_examples={s['train_examples']} must be >= 0"),
        (
            s["epochs"] is None or s["epochs"] >= 1,
            f"--epochs={s['epochs']} must be >= 1",
        ),
        (
            s["learning_rate"] is None or s["learning_rate"] > 0,
            f"--learning_rate={s['learning_rate']} must be > 0",
        ),
        (
            s["weight_decay"] is None or s["weight_decay"] >= 0,
            f"--weight_decay={s['weight_decay']} must be >= 0",
        ),
        (
            s["crop_scale"] is None or 0 < s["crop_scale"] <= 1,
            f"--crop_scale={s['crop_scale']} must be in (0, 1]",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise EvaluationError(message)
    if s["protocol"] in ("knn", "linear"):
        parse_blocks(s["block"])
    elif s["block"] is not None:
        raise EvaluationError(
            f"--block applies to knn and linear; {s['protocol']} fine-tunes the whole network"
        )
    dataset = s["dataset"] or ""
    if dataset.startswith(_TFDS_LABEL_SUBSETS) and s["label_fraction"] != 1:
        raise EvaluationError(
            f"{dataset} already is the labelled subset: use --label_fraction=1 "
            f"(got {s['label_fraction']})"
        )


# ----------------------------------------------------------------------------- splits


class Splits:
    """The labelled train rows and the evaluation split of one dataset.

    Attributes:
      train: the train Source (all of it; `train_rows` selects the labelled ones).
      train_labels: [N] labels of train by index.
      train_rows: sorted indices of the labelled train examples used.
      test: the evaluation Source: the test split, or `train` itself when held out.
      test_rows: indices of `test` evaluated (all of the test split, or the held-out rows).
      test_name: "test" (the dataset's own split name) or "held-out".
    """

    def __init__(self, dataset, data_dir, *, train_examples, label_fraction, held_out, seed):
        self.train = data.load_source(dataset, "train", data_dir, train_examples)
        if not self.train.num_classes:
            raise EvaluationError(f"{dataset} has no labels: it cannot be evaluated")
        self.train_labels = data.labels_by_index(self.train)
        test = data.load_source(dataset, "test", data_dir)
        exclude = None
        if test is None:
            # No test split: hold out a class-balanced part of train, never trained on.
            exclude = evaluation.balanced_subset(self.train_labels, held_out, seed=seed + 1)
            self.test, self.test_rows, self.test_name = self.train, exclude, "held-out"
        else:
            self.test, self.test_rows = test, np.arange(test.num_examples)
            self.test_name = test.split
        if label_fraction < 1 or exclude is not None:
            self.train_rows = evaluation.balanced_subset(
                self.train_labels, label_fraction, seed=seed, exclude=exclude
            )
        else:
            self.train_rows = np.flatnonzero(self.train_labels >= 0)
        self.num_classes = self.train.num_classes

    def describe(self):
        return {
            "train_split": {
                "examples": int(self.train.num_examples),
                "labelled_used": int(len(self.train_rows)),
            },
            "eval_split": {"name": self.test_name, "examples": int(len(self.test_rows))},
        }


# ----------------------------------------------------------------------------- protocols


def _extract(fn, source, rows, s, image_size):
    """{name: [len(rows), F]} and labels [len(rows)] of the examples `rows` of `source`."""
    if len(rows) < source.num_examples:
        source = data.subset_source(source, rows)
    pipeline = data.eval_pipeline(
        source, batch_size=max(s["batch_size"], 256), image_size=image_size
    )
    n = int(np.max(rows)) + 1
    features, labels = evaluation.extract_block_features(fn, pipeline, n)
    return {name: value[rows] for name, value in features.items()}, labels[rows]


def _with_baseline_features(fn, s, config):
    """`fn` plus the baselines' features: raw pixels and the encoder at random init."""
    if not s["baselines"]:
        return fn
    pixels = evaluation.pixel_function()
    keras.utils.set_random_seed(s["seed"])
    scratch = evaluation.block_feature_function(
        workdir_lib.encoder_from_config(config), (RANDOM_INIT_BLOCK,)
    )

    def features(images):
        random_init = {f"random_init/{k}": v for k, v in scratch(images).items()}
        return {**fn(images), **pixels(images), **random_init}

    return features


def _baselines(train, train_labels, test, test_labels, s, num_classes, linear=True):
    """The strong baselines of the same split and labels, each as strong as a standard fit.

    Raw pixels (mean-centred for kNN, standardised for the linear model) and the run's
    encoder at random initialisation (block `RANDOM_INIT_BLOCK`): weighted kNN at the
    protocol's k and with k chosen on a held-out part of train, and (linear) logistic
    regression fitted to convergence with C chosen the same way. The test split never
    chooses anything.
    """
    baselines = {}
    for name, key in (("pixel", "pixels"), ("random_init", RANDOM_INIT_KEY)):
        if key not in train:
            continue
        x_train, x_test = train[key], test[key]
        if name == "pixel":
            mean = x_train.mean(0)
            x_train, x_test = x_train - mean, x_test - mean
        baselines[f"{name}_knn"] = evaluation.knn_accuracies(
            x_train,
            train_labels,
            x_test,
            test_labels,
            k=s["knn_k"],
            temperature=s["knn_temperature"],
            num_classes=num_classes,
        )
        if name == "pixel":
            baselines["pixel_knn_tuned_k"] = evaluation.knn_tuned(
                x_train,
                train_labels,
                x_test,
                test_labels,
                temperature=s["knn_temperature"],
                num_classes=num_classes,
                seed=s["seed"],
            )
        if linear:
            baselines[f"{name}_logistic_regression"] = evaluation.logistic_regression(
                train[key], train_labels, test[key], test_labels, seed=s["seed"]
            )
    return baselines


def _linear_settings(s, epochs=None, writer=None):
    return dict(
        epochs=epochs or s["epochs"],
        batch_size=s["batch_size"],
        learning_rate=s["learning_rate"],
        weight_decay=s["weight_decay"],
        seed=s["seed"],
        summary_writer=writer,
    )


def _train_and_test_features(run, splits, s, blocks):
    """Block features (plus pixels for the baselines) and labels of the train and test rows."""
    fn = evaluation.block_feature_function(run.encoder, blocks)
    fn = _with_baseline_features(fn, s, run.config)
    size = run.config.image_size
    train, train_labels = _extract(fn, splits.train, splits.train_rows, s, size)
    test, test_labels = _extract(fn, splits.test, splits.test_rows, s, size)
    return train, train_labels, test, test_labels


def run_knn(run, splits, s):
    blocks = parse_blocks(s["block"])
    train, train_labels, test, test_labels = _train_and_test_features(run, splits, s, blocks)
    results = {
        block: evaluation.knn_accuracies(
            train[block],
            train_labels,
            test[block],
            test_labels,
            k=s["knn_k"],
            temperature=s["knn_temperature"],
            num_classes=splits.num_classes,
        )
        for block in blocks
    }
    baselines = {}
    if s["baselines"]:
        baselines = _baselines(
            train, train_labels, test, test_labels, s, splits.num_classes, linear=False
        )
    return results, baselines


def run_linear(run, splits, s, writer):
    blocks = parse_blocks(s["block"])
    train, train_labels, test, test_labels = _train_and_test_features(run, splits, s, blocks)
    if s["linear_solver"] == "lbfgs":
        results = {
            b: evaluation.logistic_regression(
                train[b], train_labels, test[b], test_labels, seed=s["seed"]
            )
            for b in blocks
        }
    else:
        results = evaluation.train_linear_probes(
            {b: train[b] for b in blocks},
            train_labels,
            {b: test[b] for b in blocks},
            test_labels,
            num_classes=splits.num_classes,
            **_linear_settings(s, writer=writer),
        )
    baselines = {}
    if s["baselines"]:
        baselines = _baselines(train, train_labels, test, test_labels, s, splits.num_classes)
    return results, baselines


def run_fine_tune(run, splits, s, writer, tensorboard_dir):
    """semi and finetune: the whole network on the labelled rows, then the evaluation split."""
    size = run.config.image_size
    labelled = data.subset_source(splits.train, splits.train_rows)
    batch_size = min(s["batch_size"], labelled.num_examples)
    if batch_size < s["batch_size"]:
        logging.warning("batch size %d > %d labelled examples", s["batch_size"], batch_size)
    scale = s["crop_scale"] if s["crop_scale"] is not None else run.config.crop_scale
    view = functools.partial(augment.crop_flip_view, scale=(scale, 1.0))
    epochs = s["epochs"]

    def labelled_epoch(epoch):
        ds = data.train_pipeline(
            labelled,
            batch_size=batch_size,
            image_size=size,
            view=view,
            seed=s["seed"],
            epoch=epoch,
        )
        return ds.map(lambda images, index, labels: (images, labels))

    test_source = splits.test
    if len(splits.test_rows) < test_source.num_examples:
        test_source = data.subset_source(test_source, splits.test_rows)
    test_ds = data.eval_pipeline(test_source, batch_size=256, image_size=size).map(
        lambda images, index, labels: (images, labels)
    )
    # A filtered subset has unknown cardinality; Keras warns at its end unless it is known.
    num_batches = -(-test_source.num_examples // 256)
    test_ds = test_ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    # Baselines and the frozen encoder's kNN with the same labels, before fine-tuning.
    baselines = {}
    train, train_labels, test, test_labels = _train_and_test_features(
        run, splits, s, ("embedding",)
    )
    baselines["frozen_embedding_knn"] = evaluation.knn_accuracies(
        train["embedding"],
        train_labels,
        test["embedding"],
        test_labels,
        k=s["knn_k"],
        temperature=s["knn_temperature"],
        num_classes=splits.num_classes,
    )
    if s["baselines"]:
        baselines.update(_baselines(train, train_labels, test, test_labels, s, splits.num_classes))
    tune = functools.partial(
        evaluation.fine_tune,
        train_epoch=labelled_epoch,
        test_dataset=test_ds,
        num_classes=splits.num_classes,
        epochs=epochs,
        steps_per_epoch=labelled.num_examples // batch_size,
        learning_rate=s["learning_rate"],
        weight_decay=s["weight_decay"],
    )
    keras.utils.set_random_seed(s["seed"])  # the new classifier's initial weights
    board = keras.callbacks.TensorBoard(log_dir=os.path.join(tensorboard_dir, "pretrained"))
    result, _ = tune(run.encoder, callbacks=[board])
    if s["baselines"]:
        # What pretraining adds: the same architecture and protocol from a random init.
        logging.info("baseline: fine-tuning a randomly initialised encoder the same way")
        keras.utils.set_random_seed(s["seed"])
        scratch = workdir_lib.encoder_from_config(run.config)
        board = keras.callbacks.TensorBoard(log_dir=os.path.join(tensorboard_dir, "random_init"))
        baselines["random_init_network"], _ = tune(scratch, callbacks=[board])
    return {"network": result}, baselines


# ----------------------------------------------------------------------------- report


def _best(results):
    block = max(results, key=lambda b: results[b]["top1"])
    return {"block": block, **results[block]}


def format_table(report):
    """The result table printed to stdout."""
    lines = [
        f"invp_tf.evaluate {report['protocol']}: {report['workdir']} (epoch "
        f"{report['checkpoint_epoch']}) on {report['dataset']}: "
        f"{report['train_split']['labelled_used']} labelled train -> "
        f"{report['eval_split']['examples']} {report['eval_split']['name']}",
        f"{'':36s}{'top1':>8s}{'top5':>8s}",
    ]
    for name, r in report["results"].items():
        lines.append(f"{name:36s}{r['top1']:8.4f}{r['top5']:8.4f}")
    for name, r in report["baselines"].items():
        lines.append(f"{'baseline ' + name:36s}{r['top1']:8.4f}{r['top5']:8.4f}")
    return "\n".join(lines)


def evaluate(s):
    """Runs one protocol with settings `s` (see make_settings); returns the report."""
    check_settings(s)
    start = time.time()
    run = workdir_lib.load_run(s["workdir"], checkpoint=s["checkpoint"])
    dataset = s["dataset"] or run.config.dataset
    data_dir = s["data_dir"]
    if data_dir is None and dataset == run.config.dataset:
        data_dir = run.config.data_dir or None
    splits = Splits(
        dataset,
        data_dir,
        train_examples=s["train_examples"],
        label_fraction=s["label_fraction"],
        held_out=s["held_out_fraction"],
        seed=s["seed"],
    )
    if s["protocol"] == "semi" and dataset != run.config.dataset:
        logging.warning(
            "semi on %s, not the run's %s: that is transfer", dataset, run.config.dataset
        )
    out_dir = os.path.join(s["workdir"], "eval")
    tensorboard_dir = os.path.join(out_dir, "tensorboard", s["protocol"])
    writer = tf.summary.create_file_writer(tensorboard_dir)
    if s["protocol"] == "knn":
        results, baselines = run_knn(run, splits, s)
    elif s["protocol"] == "linear":
        results, baselines = run_linear(run, splits, s, writer)
    else:
        results, baselines = run_fine_tune(run, splits, s, writer, tensorboard_dir)
    with writer.as_default(step=run.epoch):
        for name, r in {**results, **{f"baseline_{k}": v for k, v in baselines.items()}}.items():
            tf.summary.scalar(f"{s['protocol']}/{name}/top1", r["top1"])
            tf.summary.scalar(f"{s['protocol']}/{name}/top5", r["top5"])
    writer.flush()
    report = {
        "protocol": s["protocol"],
        "workdir": s["workdir"],
        "checkpoint_epoch": run.epoch,
        "checkpoint": run.checkpoint,
        "dataset": dataset,
        **splits.describe(),
        "settings": {k: v for k, v in s.items() if k not in ("workdir", "protocol", "output")},
        "results": results,
        "best": _best(results),
        "baselines": baselines,
        "seconds": round(time.time() - start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    output = s["output"] or os.path.join(out_dir, f"{s['protocol']}.json")
    tf.io.gfile.makedirs(os.path.dirname(output) or ".")
    tmp = output + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    tf.io.gfile.rename(tmp, output, overwrite=True)
    report["output"] = output
    return report


def main(argv):
    """Runs the evaluation of the command line `argv` (see `command.parsed`)."""
    values = command.flag_values_of(argv, _FLAGS, _FLAG_VALUES)
    try:
        report = evaluate(make_settings(values.pop("workdir"), values.pop("protocol"), **values))
    except (ValueError, FileNotFoundError) as e:
        logging.debug("stopped", exc_info=True)
        print(f"invp_tf.evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_table(report))
    print(f"wrote {report['output']}")


def run():
    """The `invp-evaluate` console command (setup.py entry point)."""
    global _FLAG_VALUES, _FLAGS
    _FLAG_VALUES, _FLAGS = flags.FLAGS, _define_flags(flags.FLAGS)
    app.run(main)


if __name__ == "__main__":
    run()
