"""The evaluation protocols of a trained run: weighted kNN, per-block linear probe, semi, transfer.

`make_settings(workdir, protocol, **overrides)` gives the `EvalConfig` of one evaluation (the
protocol's defaults where a field is None) and `evaluate(settings)` runs it: the encoder is
rebuilt from the run's flags.txt and its latest checkpoint; every protocol reports raw-pixel
and random-init baselines on the same split beside the result (weighted kNN and logistic
regression), writes a JSON report (`output`, default WORKDIR/eval/PROTOCOL.json) and
TensorBoard scalars (WORKDIR/eval/tensorboard/PROTOCOL). `invp_tf.evaluate` is the command.
"""

import dataclasses
import datetime
import functools
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from invp_tf import augment
from invp_tf import baselines as baselines_lib
from invp_tf import data
from invp_tf import evaluation
from invp_tf import fine_tuning
from invp_tf import input_pipeline
from invp_tf import model as model_lib
from invp_tf import workdir as workdir_lib

PROTOCOLS = ("knn", "linear", "semi", "finetune")
LINEAR_SOLVERS = ("lbfgs", "sgd")
# Valid values of the enumerated fields (enum flags of the command).
CHOICES = {"protocol": PROTOCOLS, "linear_solver": LINEAR_SOLVERS}
# The protocol defaults of the EvalConfig fields left None (one dataclass default cannot say
# them: they differ by protocol).
PROTOCOL_DEFAULTS = {
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
# Fields the report leaves out of its "settings" (it names them on their own).
_NOT_REPORTED = ("workdir", "protocol", "output")


class EvaluationError(ValueError):
    """Bad input to an evaluation, with a message naming the flag, file or value."""


def _field(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The settings of one evaluation; each field is a flag of `invp_tf.evaluate`.

    None: the protocol's default (PROTOCOL_DEFAULTS; `make_settings` fills it in). The field
    order is the order of the report's "settings".
    """

    workdir: str | None = _field(None, "Training run to evaluate (flags.txt + checkpoints/).")
    checkpoint: str | None = _field(
        None,
        "Checkpoint to evaluate (ckpt-N in the run's checkpoints/, or a path); default: the "
        "newest readable one (a corrupt newest one is skipped with a warning).",
    )
    protocol: str = _field("knn", "Evaluation protocol: " + ", ".join(PROTOCOLS) + ".")
    dataset: str | None = _field(
        None,
        f"Dataset to evaluate on ({data.DATASET_FORMS}); default: the run's. finetune "
        "transfers to it.",
    )
    data_dir: str | None = _field(
        None, "Data folder of --dataset; default: the run's when the dataset is the run's."
    )
    train_examples: int = _field(
        0, "Use only the first n train examples (0 = the whole train split)."
    )
    label_fraction: float | None = _field(
        None,
        "Fraction of train labels used, class-balanced, drawn with --seed; in (0, 1]. "
        "Default: 0.01 for semi, 1 otherwise.",
    )
    block: str | None = _field(
        None,
        "knn/linear: block(s) to read, comma-separated, or 'all'; of "
        f"{', '.join(evaluation.BLOCKS)}. Default: embedding for knn, all for linear.",
    )
    epochs: int | None = _field(
        None, "Training epochs (linear 100, semi 30, finetune 30 by default)."
    )
    batch_size: int | None = _field(
        None, "Batch size (knn/linear 256, semi/finetune 64 by default)."
    )
    learning_rate: float | None = _field(
        None, "Initial SGD learning rate (linear 0.1, semi/finetune 0.05 by default)."
    )
    weight_decay: float | None = _field(
        None, "Weight decay (linear 0, semi/finetune 1e-4 by default)."
    )
    learning_rates: str | None = _field(
        None,
        "semi/finetune: comma-separated learning rates to choose from. Each fine-tunes the "
        "same start (and the random-init baseline alike); the one scoring best on a "
        "class-balanced --held_out_fraction of train outside the labelled rows is reported "
        "(the test split never chooses). Default: --learning_rate alone.",
    )
    knn_k: int = _field(200, "Neighbours of the weighted kNN classifier (alias --k).")
    knn_temperature: float = _field(
        0.07, "Vote temperature of the weighted kNN (alias --temperature)."
    )
    linear_solver: str = _field(
        "lbfgs",
        "linear: lbfgs (logistic regression fitted to convergence, scikit-learn, C chosen on a "
        "held-out part of train; for up to a few 100k rows) or sgd (the paper's SGD probe, "
        "--epochs/--learning_rate/--weight_decay; for ImageNet-size feature sets).",
    )
    crop_scale: float | None = _field(
        None, "semi/finetune: min area of the random crops; default: the run's --crop_scale."
    )
    held_out_fraction: float = _field(
        0.1,
        "When the dataset has no test split: the class-balanced fraction of train held out for "
        "evaluation (never trained on).",
    )
    baselines: bool = _field(
        True,
        "Also report the baselines of the same split: raw pixels and the architecture at "
        "random init (kNN, logistic regression; semi/finetune: fine-tuned from scratch).",
    )
    baseline_cache: str | None = _field(
        None,
        "Folder of cached baselines (computed once per inputs, see invp_tf/baselines.py); "
        "default $INVP_TF_CACHE/baselines, else ~/.cache/invp_tf/baselines; 'off': no cache.",
    )
    recompute_baselines: bool = _field(
        False, "Compute the baselines even when the cache has them (and store them anew)."
    )
    seed: int = _field(0, "Seed of the label subset, shuffles and crops.")
    output: str | None = _field(None, "JSON result file; default WORKDIR/eval/PROTOCOL.json.")

    def validate(self):
        """Raises EvaluationError for the first bad value (before any work is done)."""
        if not self.workdir:
            raise EvaluationError("--workdir is required")
        for ok, message in self._checks():
            if not ok:
                raise EvaluationError(message)
        if self.protocol in ("knn", "linear"):
            parse_blocks(self.block)
        elif self.block is not None:
            raise EvaluationError(
                f"--block applies to knn and linear; {self.protocol} fine-tunes the whole network"
            )
        dataset = self.dataset or ""
        if dataset.startswith(_TFDS_LABEL_SUBSETS) and self.label_fraction != 1:
            raise EvaluationError(
                f"{dataset} already is the labelled subset: use --label_fraction=1 "
                f"(got {self.label_fraction})"
            )

    def _checks(self):
        """(ok, message) of each range check, in the order they are reported."""
        return [
            (
                self.label_fraction is not None and 0 < self.label_fraction <= 1,
                f"--label_fraction={self.label_fraction} must be in (0, 1]",
            ),
            (
                0 < self.held_out_fraction < 1,
                f"--held_out_fraction={self.held_out_fraction} must be in (0, 1)",
            ),
            (self.knn_k >= 1, f"--knn_k={self.knn_k} must be >= 1"),
            (self.knn_temperature > 0, f"--knn_temperature={self.knn_temperature} must be > 0"),
            (
                self.linear_solver in LINEAR_SOLVERS,
                f"--linear_solver={self.linear_solver} is not one of {', '.join(LINEAR_SOLVERS)}",
            ),
            (self.batch_size >= 1, f"--batch_size={self.batch_size} must be >= 1"),
            (self.train_examples >= 0, f"--train_examples={self.train_examples} must be >= 0"),
            (self.epochs is None or self.epochs >= 1, f"--epochs={self.epochs} must be >= 1"),
            (
                self.learning_rate is None or self.learning_rate > 0,
                f"--learning_rate={self.learning_rate} must be > 0",
            ),
            (
                self.weight_decay is None or self.weight_decay >= 0,
                f"--weight_decay={self.weight_decay} must be >= 0",
            ),
            (
                self.learning_rates is None or self.protocol in ("semi", "finetune"),
                f"--learning_rates applies to semi and finetune, not {self.protocol}",
            ),
            (
                all(lr > 0 for lr in _learning_rates(self.learning_rates) or [1]),
                f"--learning_rates={self.learning_rates} must list learning rates > 0",
            ),
            (
                self.crop_scale is None or 0 < self.crop_scale <= 1,
                f"--crop_scale={self.crop_scale} must be in (0, 1]",
            ),
        ]

    def reported(self):
        """The "settings" of the report: every field but workdir, protocol and output."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_REPORTED}


def _learning_rates(text):
    """'0.01,0.1' -> [0.01, 0.1]; None -> None. Raises EvaluationError naming a bad entry."""
    if text is None:
        return None
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise EvaluationError(f"--learning_rates={text}: not a comma-separated list") from None


def make_settings(workdir, protocol, **overrides):
    """The EvalConfig of one evaluation: field defaults, then `overrides`, then the protocol's
    defaults for the fields still None.

    Raises:
      EvaluationError: unknown protocol or setting name.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"--protocol={protocol}: valid protocols: {', '.join(PROTOCOLS)}")
    unknown = set(overrides) - {field.name for field in dataclasses.fields(EvalConfig)}
    if unknown:
        raise EvaluationError(f"unknown evaluation setting(s): {sorted(unknown)}")
    settings = EvalConfig(**overrides, workdir=workdir, protocol=protocol)
    defaults = dict(PROTOCOL_DEFAULTS[protocol])
    if str(settings.dataset or "").startswith(_TFDS_LABEL_SUBSETS):
        defaults["label_fraction"] = 1.0
    unset = {name: value for name, value in defaults.items() if getattr(settings, name) is None}
    return dataclasses.replace(settings, **unset)


def output_path(settings):
    """Where the JSON report of `settings` goes: --output, else WORKDIR/eval/PROTOCOL.json."""
    return settings.output or os.path.join(settings.workdir, "eval", f"{settings.protocol}.json")


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

    def tuning_rows(self, fraction, seed):
        """Class-balanced train rows outside the labelled and evaluated ones, for choosing a
        hyperparameter (the labelled rows train, the evaluation split never chooses)."""
        used = self.train_rows
        if self.test is self.train:
            used = np.union1d(used, self.test_rows)
        return evaluation.balanced_subset(self.train_labels, fraction, seed=seed + 2, exclude=used)

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
    pipeline = input_pipeline.eval_pipeline(
        source, batch_size=max(s.batch_size, 256), image_size=image_size
    )
    n = int(np.max(rows)) + 1
    features, labels = evaluation.extract_block_features(fn, pipeline, n)
    return {name: value[rows] for name, value in features.items()}, labels[rows]


def _linear_settings(s, epochs=None, writer=None):
    return dict(
        epochs=epochs or s.epochs,
        batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        seed=s.seed,
        summary_writer=writer,
    )


def _train_and_test_features(run, splits, s, blocks):
    """Block features (plus pixels for the baselines) and labels of the train and test rows."""
    fn = evaluation.block_feature_function(run.encoder, blocks)
    if s.baselines:
        fn = baselines_lib.with_features(fn, s.seed, run.config)
    size = run.config.image_size
    train, train_labels = _extract(fn, splits.train, splits.train_rows, s, size)
    test, test_labels = _extract(fn, splits.test, splits.test_rows, s, size)
    return train, train_labels, test, test_labels


def run_knn(run, splits, s):
    blocks = parse_blocks(s.block)
    train, train_labels, test, test_labels = _train_and_test_features(run, splits, s, blocks)
    results = {
        block: evaluation.knn_accuracies(
            train[block],
            train_labels,
            test[block],
            test_labels,
            k=s.knn_k,
            temperature=s.knn_temperature,
            num_classes=splits.num_classes,
        )
        for block in blocks
    }
    baselines = {}
    if s.baselines:
        baselines = baselines_lib.compute(
            train, train_labels, test, test_labels, s, splits.num_classes, linear=False
        )
    return results, baselines


def run_linear(run, splits, s, writer):
    blocks = parse_blocks(s.block)
    train, train_labels, test, test_labels = _train_and_test_features(run, splits, s, blocks)
    if s.linear_solver == "lbfgs":
        results = {
            b: evaluation.logistic_regression(
                train[b], train_labels, test[b], test_labels, seed=s.seed
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
    if s.baselines:
        baselines = baselines_lib.compute(
            train, train_labels, test, test_labels, s, splits.num_classes
        )
    return results, baselines


def run_fine_tune(run, splits, s, writer, tensorboard_dir):
    """semi and finetune: the whole network on the labelled rows, then the evaluation split."""
    size = run.config.image_size
    labelled = data.subset_source(splits.train, splits.train_rows)
    batch_size = min(s.batch_size, labelled.num_examples)
    if batch_size < s.batch_size:
        logging.warning("batch size %d > %d labelled examples", s.batch_size, batch_size)
    scale = s.crop_scale if s.crop_scale is not None else run.config.crop_scale
    view = functools.partial(augment.crop_flip_view, scale=(scale, 1.0))
    epochs = s.epochs

    def labelled_epoch(epoch):
        ds = input_pipeline.train_pipeline(
            labelled,
            batch_size=batch_size,
            image_size=size,
            view=view,
            seed=s.seed,
            epoch=epoch,
        )
        return ds.map(lambda images, index, labels: (images, labels))

    test_ds = fine_tuning.eval_batches(splits.test, splits.test_rows, size)
    learning_rates = _learning_rates(s.learning_rates) or [s.learning_rate]
    held_ds = None
    if len(learning_rates) > 1:
        held_rows = splits.tuning_rows(s.held_out_fraction, s.seed)
        held_ds = fine_tuning.eval_batches(splits.train, held_rows, size)
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
        k=s.knn_k,
        temperature=s.knn_temperature,
        num_classes=splits.num_classes,
    )
    if s.baselines:
        baselines.update(
            baselines_lib.compute(train, train_labels, test, test_labels, s, splits.num_classes)
        )
    tune = functools.partial(
        fine_tuning.fine_tune,
        train_epoch=labelled_epoch,
        num_classes=splits.num_classes,
        epochs=epochs,
        steps_per_epoch=labelled.num_examples // batch_size,
        weight_decay=s.weight_decay,
    )
    start = run.encoder.get_weights()

    def pretrained():
        run.encoder.set_weights(start)
        return run.encoder

    def scratch():
        keras.utils.set_random_seed(s.seed)
        return model_lib.encoder_from_config(run.config)

    tuned = functools.partial(
        fine_tuning.tuned_fine_tune,
        tune,
        learning_rates=learning_rates,
        held_ds=held_ds,
        test_ds=test_ds,
        seed=s.seed,
    )
    result = tuned(pretrained, log_dir=os.path.join(tensorboard_dir, "pretrained"))
    if s.baselines:
        # What pretraining adds: the same architecture and protocol from a random init.
        logging.info("baseline: fine-tuning a randomly initialised encoder the same way")
        baselines["random_init_network"] = tuned(
            scratch, log_dir=os.path.join(tensorboard_dir, "random_init")
        )
    return {"network": result}, baselines


# ----------------------------------------------------------------------------- report


def _best(results):
    """The block whose held-out top-1 is highest, or None when a block has no held-out score.

    The test set never chooses: a block's score is its held-out top-1 at the setting the
    held-out part chose (the best of `held_out_top1`). The kNN protocol and the SGD probes
    score no held-out part, so they name no best block.
    """
    scores = {}
    for block, r in results.items():
        held_out = r.get("held_out_top1")
        if not held_out:
            return None
        scores[block] = max(held_out.values())
    block = max(scores, key=scores.get)
    return {
        "block": block,
        "chosen_on": "held-out",
        "held_out_score": scores[block],
        **results[block],
    }


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
    """Runs one protocol with the EvalConfig `s` (see make_settings); returns the report."""
    s.validate()
    start = time.time()
    run = workdir_lib.load_run(s.workdir, checkpoint=s.checkpoint)
    dataset = s.dataset or run.config.dataset
    data_dir = s.data_dir
    if data_dir is None and dataset == run.config.dataset:
        data_dir = run.config.data_dir or None
    splits = Splits(
        dataset,
        data_dir,
        train_examples=s.train_examples,
        label_fraction=s.label_fraction,
        held_out=s.held_out_fraction,
        seed=s.seed,
    )
    if s.protocol == "semi" and dataset != run.config.dataset:
        logging.warning(
            "semi on %s, not the run's %s: that is transfer", dataset, run.config.dataset
        )
    out_dir = os.path.join(s.workdir, "eval")
    tensorboard_dir = os.path.join(out_dir, "tensorboard", s.protocol)
    writer = tf.summary.create_file_writer(tensorboard_dir)
    # Baselines cached for these inputs: the protocol computes none of them.
    lookup = baselines_lib.Lookup.of(s, run.config, splits, dataset)
    run_s = dataclasses.replace(s, baselines=False) if lookup.hit else s
    if s.protocol == "knn":
        results, baselines = run_knn(run, splits, run_s)
    elif s.protocol == "linear":
        results, baselines = run_linear(run, splits, run_s, writer)
    else:
        results, baselines = run_fine_tune(run, splits, run_s, writer, tensorboard_dir)
    baselines = lookup.complete(baselines, seconds=time.time() - start)
    with writer.as_default(step=run.epoch):
        for name, r in {**results, **{f"baseline_{k}": v for k, v in baselines.items()}}.items():
            tf.summary.scalar(f"{s.protocol}/{name}/top1", r["top1"])
            tf.summary.scalar(f"{s.protocol}/{name}/top5", r["top5"])
    writer.flush()
    report = {
        "protocol": s.protocol,
        "workdir": s.workdir,
        "checkpoint_epoch": run.epoch,
        "checkpoint": run.checkpoint,
        "dataset": dataset,
        **splits.describe(),
        "settings": s.reported(),
        "results": results,
        "best": _best(results),
        "baselines": baselines,
        "baseline_cache": lookup.report(),
        "seconds": round(time.time() - start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    output = output_path(s)
    tf.io.gfile.makedirs(os.path.dirname(output) or ".")
    workdir_lib.write_atomically(output, json.dumps(report, indent=2) + "\n", "the report")
    report["output"] = output
    return report
