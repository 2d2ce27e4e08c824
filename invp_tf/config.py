"""The run configuration: one dataclass whose fields are the train flags, and its checks.

`train` (the command) defines one absl flag per field (same name, default and help; an enum
for the fields of CHOICES), so the flag set, the config and `flags.txt` cannot drift apart.
`Config.validate(num_examples)` names the flag whose value cannot work.
"""

import dataclasses

import tensorflow as tf

from invp_tf import augment
from invp_tf import data
from invp_tf import distribute
from invp_tf import encoder
from invp_tf import losses
from invp_tf import neighbors
from invp_tf import propagation

# Valid values of the enumerated flags. Those naming a model part come from the
# module that implements it, so a new head or recipe is a flag value at once.
CHOICES = {
    "encoder": encoder.BACKBONES,
    "head": encoder.HEADS,
    "background": losses.BACKGROUNDS,
    "background_search": losses.BACKGROUND_SEARCHES,
    "positive_mode": losses.POSITIVE_MODES,
    "knn_method": neighbors.METHODS,
    "augment": tuple(augment.RECIPES),
    "lr_schedule": ("cosine", "step", "constant"),
    "knn_features": ("bank", "fresh"),
    "graph_features": ("bank", "fresh"),
    "bank_init": ("random", "encoder"),
    "strategy": distribute.STRATEGIES,
    "normalization": tuple(encoder.NORMALIZATIONS),
}

_MONITOR_ONLY = "kNN monitor only"
# Smallest --image_size: a crop of 8x8 pixels still has structure after the encoder's stem.
MIN_IMAGE_SIZE = 8


def _field(default, help_text, safe_to_change=None):
    """A Config field: its flag's default and help; `safe_to_change` says why a rerun of a run
    with a checkpoint may change it (workdir.SAFE_TO_CHANGE), None where it may not."""
    metadata = {"help": help_text}
    if safe_to_change:
        metadata["safe_to_change"] = safe_to_change
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config(losses.LossConfig):
    """Defaults are the paper's ImageNet recipe (ResNet-50, linear head).

    The loss's settings are the fields of `losses.LossConfig`, which this class extends;
    `config.loss` is that part alone, the one object the model and the loss read.
    """

    workdir: str = _field(
        "",
        "Run directory: flags.txt, checkpoints, metrics, TensorBoard.",
        safe_to_change="the same folder, spelled another way",
    )
    dataset: str = _field("fashion_mnist", f"Dataset: {data.DATASET_FORMS}.")
    data_dir: str = _field(
        "", "IDX folder for fashion_mnist, tfds data_dir, or empty for defaults."
    )
    train_examples: int = _field(0, "Use the first n training examples (0 = all).")
    epochs: int = _field(
        800,
        "Training epochs.",
        safe_to_change="extends (or ends) the run; a cosine or warm-up schedule is stretched to it",
    )
    batch_size: int = _field(128, "Global batch size.")
    image_size: int = _field(224, "Side of the square training crop.")
    augment: str = _field("moco_v2", "View augmentation recipe.")
    crop_scale: float = _field(
        0.2, "Smallest area fraction of the random resized crop of --augment=crop_flip."
    )
    encoder: str = _field("resnet50", "Backbone.")
    width_multiplier: float = _field(1.0, "Channel width multiplier of the backbone.")
    head: str = _field(
        "linear",
        "Projection head: linear (tau 0.07), mlp (tau 0.2) or mlp_bn (mlp with BatchNorm).",
    )
    stem_width: int = _field(
        0,
        "Channels of the stem conv (0: 64 x --width_multiplier). The authors' width scales the "
        "stages only: their checkpoints import with 64.",
    )
    head_hidden_dim: int = _field(
        0, "Width of the hidden layer of the mlp heads (0: the pooled feature size F)."
    )
    normalization: str = _field(
        "imagenet",
        "Mean/std the encoder standardises its [0, 1] input images with (exports apply it "
        "too): imagenet, or cifar (the authors' CIFAR models).",
    )
    embedding_dim: int = _field(128, "Dimension D of the embedding and the memory bank.")
    num_neighbors: int = _field(4, "k of the kNN graph over the bank.")
    lambda_inv: float = _field(0.6, "Weight of the invariance loss after the ramp-up.")
    rampup_epochs: int = _field(30, "Epochs T of instance discrimination only before L_inv.")
    memory_momentum: float = _field(0.5, "Momentum m of the memory bank update.")
    knn_method: str = _field(
        "scann",
        "kNN graph builder: scann, brute_force (exact, NumPy), matmul (exact, TF ops on the "
        "accelerator if any) or auto (matmul on a GPU/TPU, scann on a CPU).",
    )
    graph_features: str = _field(
        "bank",
        "Rows the kNN graph is built over between epochs: the memory bank, or fresh embeddings "
        "of the current encoder over the training images (one inference pass per epoch).",
    )
    bank_init: str = _field(
        "random", "Initial bank: random unit rows (paper) or embeddings of the initial encoder."
    )
    optimizer_momentum: float = _field(0.9, "SGD momentum.")
    learning_rate: float = _field(0.03, "Base learning rate.")
    lr_schedule: str = _field("cosine", "Learning rate schedule over all epochs.")
    lr_decay_epochs: str = _field("120,160", "Epochs where the step schedule divides lr by 10.")
    warmup_epochs: int = _field(0, "Linear learning rate warm-up epochs.")
    weight_decay: float = _field(
        1e-4,
        "Decoupled SGD weight decay (Keras SGD: w -= lr * wd * w each step, outside the "
        "momentum). PyTorch's coupled decay with momentum m acts about 1 / (1 - m) = 10x "
        "stronger: the paper's 1e-4 corresponds to about 1e-3 here.",
    )
    knn_k: int = _field(200, "Neighbours of the kNN monitor.", _MONITOR_ONLY)
    knn_temperature: float = _field(0.07, "Vote temperature of the kNN monitor.", _MONITOR_ONLY)
    knn_features: str = _field(
        "bank",
        "Train features of the kNN monitor: the bank, or fresh encoder features.",
        _MONITOR_ONLY,
    )
    eval_every: int = _field(
        1,
        "Run the kNN monitor every n epochs (and after the last).",
        "when the kNN monitor runs; training does not read it",
    )
    jit_compile: bool = _field(
        False,
        "XLA-compile the train step.",
        "XLA compiles the same step; results match up to round-off",
    )
    strategy: str = _field(
        "default",
        "tf.distribute strategy: default (one device), mirrored (all local GPUs, or "
        "--cpu_devices logical CPUs), multi_worker (cluster from TF_CONFIG) or tpu.",
        "where the same computation runs; results match up to summation order",
    )
    tpu: str = _field(
        "",
        "TPU name or grpc:// address of --strategy=tpu (empty: the local TPU).",
        "where the same computation runs",
    )
    cpu_devices: int = _field(
        0,
        "Split the CPU into this many logical devices (0: no split); for mirrored on a CPU.",
        "where the same computation runs",
    )
    sync_batchnorm: bool = _field(
        True,
        "BatchNorm statistics over the global batch when several replicas train (so N "
        "replicas with global batch B match one device with batch B); False: per replica.",
    )
    mixed_precision: bool = _field(
        False,
        "mixed_float16 on GPUs, mixed_bfloat16 on TPUs and CPUs, in the encoder; the "
        "embedding, bank and similarity/log-sum-exp path stay float32.",
    )
    seed: int = _field(0, "Seed of weights, bank, shuffling and augmentation.")
    device_memory_gb: float = _field(
        0.0,
        "Memory of one device in GB: a run whose memory plan (printed at startup) exceeds it "
        "stops before the first step, naming the largest term (0: the GPU's reported memory, "
        "no check without a GPU).",
        safe_to_change="only checks the memory plan before the first step",
    )
    dry_run: bool = _field(
        False,
        "Print the memory plan per replica and stop: no training, nothing written.",
        safe_to_change="prints the memory plan; trains nothing",
    )

    @property
    def loss(self):
        """The loss's settings (`losses.LossConfig`) of this config."""
        return losses.LossConfig(
            **{
                field.name: getattr(self, field.name)
                for field in dataclasses.fields(losses.LossConfig)
            }
        )

    def flagfile_lines(self):
        """`--name=value` lines that replay this config through absl flags."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                lines.append(f"--{field.name}" if value else f"--no{field.name}")
            else:
                lines.append(f"--{field.name}={value}")
        return lines

    @classmethod
    def from_flagfile(cls, path):
        """Reads a run's flags.txt (as written by flagfile_lines) without absl.

        Lets other entry points rebuild a run's config while defining flags of
        their own. Unknown flags raise ValueError naming them.
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        values = {}
        with tf.io.gfile.GFile(path) as f:  # workdirs may live on gs:// etc.
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, value = line.lstrip("-").partition("=")
                if not sep and name.startswith("no") and name[2:] in fields:
                    name, value = name[2:], "false"
                elif not sep:
                    value = "true"
                if name not in fields:
                    raise ValueError(f"{path}: unknown flag --{name}")
                kind = type(fields[name].default)
                if kind is bool:
                    values[name] = value.lower() in ("true", "1")
                else:
                    values[name] = kind(value)
        return cls(**values)

    def validate(self, num_examples):
        """Raises ValueError naming the flag whose value cannot work with N training rows."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"--{name}={getattr(self, name)} is not one of {', '.join(choices)}"
                )
        checks = [
            (
                self.num_background <= num_examples,
                f"--num_background={self.num_background} exceeds the {num_examples} training "
                "images",
            ),
            (
                1 <= self.num_neighbors < num_examples,
                f"--num_neighbors={self.num_neighbors} must be in [1, {num_examples}) "
                f"(the dataset has {num_examples} training images)",
            ),
            (
                1 <= self.batch_size <= num_examples,
                f"--batch_size={self.batch_size} must be in [1, {num_examples}] "
                f"(the dataset has {num_examples} training images)",
            ),
            (self.num_background >= 1, f"--num_background={self.num_background} must be >= 1"),
            (self.num_layers >= 1, f"--num_layers={self.num_layers} must be >= 1"),
            (self.num_positives >= 1, f"--num_positives={self.num_positives} must be >= 1"),
            (self.num_knn_positives >= 0, f"--num_knn_positives={self.num_knn_positives} < 0"),
            (self.embedding_dim >= 1, f"--embedding_dim={self.embedding_dim} must be >= 1"),
            (self.stem_width >= 0, f"--stem_width={self.stem_width} must be >= 0"),
            (self.head_hidden_dim >= 0, f"--head_hidden_dim={self.head_hidden_dim} must be >= 0"),
            (
                self.image_size >= MIN_IMAGE_SIZE,
                f"--image_size={self.image_size} must be >= {MIN_IMAGE_SIZE} (smaller crops "
                "leave the encoder nothing to see)",
            ),
            (self.temperature > 0, f"--temperature={self.temperature} must be > 0"),
            (self.epochs >= 1, f"--epochs={self.epochs} must be >= 1"),
            (self.eval_every >= 1, f"--eval_every={self.eval_every} must be >= 1"),
            (self.knn_k >= 1, f"--knn_k={self.knn_k} must be >= 1"),
            (self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be > 0"),
            (0 < self.crop_scale <= 1, f"--crop_scale={self.crop_scale} must be in (0, 1]"),
            (
                self.device_memory_gb >= 0,
                f"--device_memory_gb={self.device_memory_gb} must be >= 0",
            ),
            (
                0 <= self.memory_momentum < 1,
                f"--memory_momentum={self.memory_momentum} must be in [0, 1)",
            ),
        ]
        try:
            self.lr_decay_epoch_list  # noqa: B018 (parsed here to name the flag on error)
        except ValueError:
            raise ValueError(
                f"--lr_decay_epochs={self.lr_decay_epochs} must be comma-separated integers"
            ) from None
        if self.positive_mode == "knn":
            k = self.num_knn_positives or propagation.max_set_size(
                self.num_neighbors, self.num_layers
            )
            # "The K rows of TopM(i) most similar to v_i, minus i": TopM must hold K + 1 rows.
            top = self.num_background if self.hard_negatives else num_examples
            checks.append(
                (
                    k + 1 <= min(top, num_examples),
                    f"--num_knn_positives={k} needs K + 1 = {k + 1} <= --num_background "
                    f"({self.num_background}) and <= the {num_examples} training images",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def lr_decay_epoch_list(self):
        return [int(e) for e in self.lr_decay_epochs.split(",") if e.strip()]
