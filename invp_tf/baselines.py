"""The strong baselines of an evaluation, computed once per inputs and cached.

Every protocol reports, beside the run's result, what the same split and labels give
without pretraining: raw pixels and the run's architecture at random initialisation
(weighted kNN, kNN with k chosen on held-out train rows, logistic regression fitted to
convergence; semi/finetune also fine-tune the random-init network). None of it depends on
the trained weights, so it is computed once per `inputs(...)` and kept in a cache folder:

    $INVP_TF_CACHE/baselines, else $XDG_CACHE_HOME/invp_tf/baselines, else
    ~/.cache/invp_tf/baselines    (one JSON file per key, created 0700)

As for the kernel cache, only a folder of this user that no group or other user can write
is used: in any other, entries planted by someone else would be reported as this run's
baselines, so a warning names the folder and the baselines are computed and not stored.

The key is a SHA-256 over everything the numbers depend on: the datasets' fingerprints
(`identity.fingerprint`: file bytes, tfds version, folder listing), the labelled train rows
and evaluated rows, the image size, the kNN and fine-tuning settings, the seed, every
run flag that can shape a random-initialised encoder, and the source of the code that
computes them. Any change is a new key (a miss); `--recompute_baselines` ignores hits.
"""

import dataclasses
import datetime
import hashlib
import inspect
import json
import pathlib

import keras
import numpy as np
from absl import logging

from invp_tf import encoder as encoder_lib
from invp_tf import evaluation
from invp_tf import identity
from invp_tf import kernels
from invp_tf import model as model_lib
from invp_tf import workdir as workdir_lib

# Folders `Cache.usable` refused in this process (warned once each).
_REFUSED = set()
# Bump when what a cached entry holds changes shape.
CACHE_VERSION = 1
# The random-initialised encoder's block read by the baselines: the pooled backbone, the
# features a user transfers.
RANDOM_INIT_BLOCK = "stage4"
RANDOM_INIT_KEY = "random_init/" + RANDOM_INIT_BLOCK
# Run flags that cannot change a random-initialised encoder's features: the training
# procedure, the loss, the monitor and where it runs. Every other flag, a future one
# included, is part of the key.
_TRAINING_ONLY = frozenset(
    "workdir dataset data_dir train_examples epochs batch_size augment crop_scale temperature "
    "num_neighbors num_layers num_positives num_background lambda_inv rampup_epochs "
    "memory_momentum background background_search positive_mode num_knn_positives "
    "hard_positives hard_negatives knn_method graph_features bank_init optimizer_momentum "
    "learning_rate lr_schedule lr_decay_epochs warmup_epochs weight_decay knn_k "
    "knn_temperature knn_features eval_every jit_compile strategy tpu cpu_devices "
    "sync_batchnorm seed".split()
)
# Entries of a protocol's baselines that read the trained run: never cached.
RUN_DEPENDENT = ("frozen_embedding_knn",)


def default_folder():
    return pathlib.Path(kernels.cache_dir()) / "baselines"


def _sha256(value):
    return hashlib.sha256(value).hexdigest()


def _code_fingerprint():
    """The source of the modules whose code computes the baselines' numbers."""
    sources = [inspect.getsource(module) for module in (evaluation, encoder_lib)]
    sources.append(inspect.getsource(inspect.getmodule(_code_fingerprint)))
    return _sha256("\0".join(sources).encode())


def inputs(settings, config, splits, dataset, crop_scale=None):
    """What the baselines of one evaluation depend on, as a JSON-able dict.

    Args:
      settings: the evaluation's `protocols.EvalConfig`.
      config: the run's `config.Config` (its architecture shapes the random init).
      splits: the evaluation's `protocols.Splits`.
      dataset: the evaluated dataset's string.
      crop_scale: semi/finetune: the crop scale the fine-tuning uses.
    """
    s = settings
    kind = s.protocol if s.protocol in ("knn", "linear") else "finetune"
    architecture = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _TRAINING_ONLY
    }
    result = {
        "version": CACHE_VERSION,
        "kind": kind,
        "dataset": dataset,
        "train": identity.fingerprint(splits.train),
        "test": identity.fingerprint(splits.test),
        "test_name": splits.test_name,
        "train_rows": _sha256(np.asarray(splits.train_rows, np.int64).tobytes()),
        "test_rows": _sha256(np.asarray(splits.test_rows, np.int64).tobytes()),
        "num_classes": splits.num_classes,
        "knn_k": s.knn_k,
        "knn_temperature": s.knn_temperature,
        "seed": s.seed,
        "architecture": architecture,
        "code": _code_fingerprint(),
    }
    if kind == "finetune":
        result["fine_tune"] = {
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "weight_decay": s.weight_decay,
            "crop_scale": crop_scale,
            "learning_rates": s.learning_rates,
            "held_out_fraction": s.held_out_fraction,
        }
    return result


def key(inputs_):
    return _sha256(json.dumps(inputs_, sort_keys=True).encode())


class Cache:
    """Baselines kept as one JSON file per key in `folder`."""

    def __init__(self, folder=None):
        self.folder = pathlib.Path(folder) if folder else default_folder()

    def path(self, inputs_):
        return self.folder / f"{key(inputs_)[:32]}.json"

    def usable(self):
        """Whether the folder is private to this user (`kernels.unsafe_folder`; created 0700
        when missing); the first refusal of a folder in a process logs a warning naming it."""
        problem = kernels.unsafe_folder(self.folder)
        if problem is not None and str(self.folder) not in _REFUSED:
            _REFUSED.add(str(self.folder))
            logging.warning(
                "Not using the baseline cache %s: %s; the baselines are computed and not "
                "stored (see INVP_TF_CACHE in README.md).",
                self.folder,
                problem,
            )
        return problem is None

    def load(self, inputs_):
        """The cached baselines of `inputs_`, or None (absent, unreadable, another key or an
        unusable folder)."""
        if not self.usable():
            return None
        path = self.path(inputs_)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("inputs") != inputs_:
            return None  # a truncated file or a (vanishingly unlikely) prefix collision
        return entry.get("baselines")

    def store(self, inputs_, baselines, seconds):
        """Writes the entry atomically; returns its path (None: an unusable folder)."""
        if not self.usable():
            return None
        path = self.path(inputs_)
        entry = {
            "inputs": inputs_,
            "baselines": baselines,
            "seconds": round(seconds, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        workdir_lib.write_atomically(str(path), json.dumps(entry, indent=1) + "\n", "baselines")
        return path


@dataclasses.dataclass
class Lookup:
    """One evaluation's baselines in the cache: found (`hit`), or to be stored once computed."""

    cache: Cache | None = None  # None: baselines off, or --baseline_cache=off
    inputs: dict | None = None
    cached: dict | None = None

    @classmethod
    def of(cls, settings, config, splits, dataset):
        """Looks up the baselines of an evaluation (`inputs`' arguments; crop scale resolved)."""
        s = settings
        if not s.baselines or s.baseline_cache == "off":
            return cls()
        scale = s.crop_scale if s.crop_scale is not None else config.crop_scale
        key_inputs = inputs(s, config, splits, dataset, crop_scale=scale)
        cache = Cache(s.baseline_cache)
        return cls(cache, key_inputs, None if s.recompute_baselines else cache.load(key_inputs))

    @property
    def hit(self):
        return self.cached is not None

    def complete(self, baselines, seconds):
        """The protocol's `baselines` with the cached ones added (a hit), or stored (a miss)."""
        if self.hit:
            return {**baselines, **self.cached}
        if self.cache is not None:
            computed = {k: v for k, v in baselines.items() if k not in RUN_DEPENDENT}
            self.cache.store(self.inputs, computed, seconds)
        return baselines

    def report(self):
        """The report's `baseline_cache`: {"hit", "file"}, or None without a cache."""
        if self.cache is None:
            return None
        return {"hit": self.hit, "file": str(self.cache.path(self.inputs))}


def with_features(fn, seed, config):
    """`fn` plus the baselines' features: raw pixels and the encoder at random init."""
    pixels = evaluation.pixel_function()
    keras.utils.set_random_seed(seed)
    scratch = evaluation.block_feature_function(
        model_lib.encoder_from_config(config), (RANDOM_INIT_BLOCK,)
    )

    def features(images):
        random_init = {f"random_init/{k}": v for k, v in scratch(images).items()}
        return {**fn(images), **pixels(images), **random_init}

    return features


def compute(train, train_labels, test, test_labels, s, num_classes, linear=True):
    """The strong baselines of the same split and labels, each as strong as a standard fit.

    Raw pixels (mean-centred for kNN, standardised for the linear model) and the run's
    encoder at random initialisation (block `RANDOM_INIT_BLOCK`): weighted kNN at the
    protocol's k and with k chosen on a held-out part of train, and (linear) logistic
    regression fitted to convergence with C chosen the same way. The test split never
    chooses anything.
    """
    baselines = {}
    for name, feature in (("pixel", "pixels"), ("random_init", RANDOM_INIT_KEY)):
        if feature not in train:
            continue
        x_train, x_test = train[feature], test[feature]
        if name == "pixel":
            mean = x_train.mean(0)
            x_train, x_test = x_train - mean, x_test - mean
        baselines[f"{name}_knn"] = evaluation.knn_accuracies(
            x_train,
            train_labels,
            x_test,
            test_labels,
            k=s.knn_k,
            temperature=s.knn_temperature,
            num_classes=num_classes,
        )
        if name == "pixel":
            baselines["pixel_knn_tuned_k"] = evaluation.knn_tuned(
                x_train,
                train_labels,
                x_test,
                test_labels,
                temperature=s.knn_temperature,
                num_classes=num_classes,
                seed=s.seed,
            )
        if linear:
            baselines[f"{name}_logistic_regression"] = evaluation.logistic_regression(
                train[feature], train_labels, test[feature], test_labels, seed=s.seed
            )
    return baselines
