"""A run folder from a pretrained PyTorch ResNet: the authors' checkpoints, torchvision's, MoCo's.

`import_checkpoint(settings)` reads a `torch.save` file with `torch_checkpoint` (no torch, no
code from the file is run), maps its ResNet onto `encoder.Encoder` with `resnet_keys` and
writes a complete run folder: flags.txt (the architecture read from the checkpoint's keys and
shapes, the input normalisation its training used, the training flags of --recipe),
checkpoints/ckpt-EPOCH with the parts a training checkpoint has (encoder, optimizer, bank,
graph, epoch, step) and imported.json, the record of where the weights came from (file,
SHA-256, format, every key and what became of it). Evaluation, export, embedding, analysis and
continued training read the folder as they read a trained one; the export adds a model card
from imported.json.
"""

import dataclasses
import datetime
import json
import os

import keras
import numpy as np
import tensorflow as tf

from invp_tf import config as config_lib
from invp_tf import encoder as encoder_lib
from invp_tf import memory_bank
from invp_tf import model as model_lib
from invp_tf import neighbors
from invp_tf import resnet_keys
from invp_tf import rundir
from invp_tf import torch_checkpoint
from invp_tf import workdir as workdir_lib

IMPORT_FILE = "imported.json"
# Image side a run gets for each stem unless told: the authors' training crops.
_STEM_IMAGE_SIZE = {"imagenet": 224, "cifar": 32}
# The paper's temperature for each head (section 1 of the design).
_HEAD_TEMPERATURE = {"linear": 0.07, "mlp": 0.2}
# --normalization: auto (the stem's, see resnet_keys) or one of the encoder's.
NORMALIZATION_CHOICES = ("auto", *encoder_lib.NORMALIZATIONS)


def _field(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """The settings of one import; each field is a flag of `invp_tf.import_checkpoint`."""

    checkpoint: str = _field("", "PyTorch checkpoint (a torch.save file, zip or legacy format).")
    workdir: str = _field("", "Run folder to write; it must not hold a run yet.")
    recipe: str = _field(
        "",
        "Flags file (configs/*.flags or a run's flags.txt) giving the run's training flags: "
        "data, schedule, loss. The architecture always comes from the checkpoint. Needed to "
        "continue training on your data (train refuses a changed --dataset later).",
    )
    image_size: int = _field(
        0,
        "Side of the run's images (0: the recipe's, else 224 for the ImageNet stem, 32 for "
        "the CIFAR stem).",
    )
    normalization: str = _field(
        "auto",
        "Input mean/std of the run: auto (what the checkpoint's models were trained with: "
        "ImageNet's for the ImageNet stem (the authors' resnet.py, torchvision, MoCo), CIFAR's "
        "for the CIFAR stem (the authors' resnet_cifar.py)), imagenet or cifar.",
    )
    num_examples: int = _field(
        0,
        "Rows of the memory bank of a checkpoint that has none (torchvision, MoCo, a bare "
        "state_dict): random unit rows and their kNN graph, one per training image of a "
        "continued run. Ignored when the checkpoint has a bank.",
    )


class ImportCheckpointError(ValueError):
    """A checkpoint that cannot become a run, in one line."""


def _variables_by_path(encoder):
    # "encoder/backbone/stem_conv/conv/kernel" -> "backbone/stem_conv/conv/kernel".
    return {variable.path.split("/", 1)[1]: variable for variable in encoder.weights}


def assign(encoder, state):
    """Assigns a resnet_keys.ResNetState to a built encoder.Encoder; names any misfit."""
    variables = _variables_by_path(encoder)
    missing = sorted(set(variables) - set(state.weights))
    if missing:
        raise ImportCheckpointError(f"the checkpoint gives no value for {', '.join(missing[:5])}")
    for path, value in state.weights.items():
        variable = variables.get(path)
        if variable is None:
            raise ImportCheckpointError(
                f"{state.sources[path]} maps to {path}, which the encoder lacks"
            )
        if tuple(variable.shape) != value.shape:
            raise ImportCheckpointError(
                f"{state.sources[path]} has shape {list(value.shape)} in Keras layout, the "
                f"encoder's {path} {list(variable.shape)}"
            )
        variable.assign(value)


def _run_config(settings, state):
    """The Config of the imported run: the recipe's flags, the checkpoint's architecture."""
    architecture = state.architecture
    stem = "cifar" if architecture.encoder.endswith("_cifar") else "imagenet"
    if settings.recipe:
        try:
            base = config_lib.Config.from_flagfile(settings.recipe)
        except (ValueError, OSError, tf.errors.OpError) as e:
            raise ImportCheckpointError(f"--recipe={settings.recipe}: {e}") from None
    else:
        base = config_lib.Config(temperature=_HEAD_TEMPERATURE[architecture.head])
    image_size = settings.image_size or (
        base.image_size if settings.recipe else _STEM_IMAGE_SIZE[stem]
    )
    normalization = settings.normalization
    if normalization == "auto":
        normalization = architecture.normalization
    overrides = dict(
        workdir=settings.workdir,
        encoder=architecture.encoder,
        width_multiplier=architecture.width_multiplier,
        stem_width=architecture.stem_width,
        head=architecture.head,
        head_hidden_dim=architecture.head_hidden_dim,
        embedding_dim=architecture.embedding_dim,
        normalization=normalization,
        image_size=image_size,
    )
    if state.neigh is not None:
        overrides["num_neighbors"] = int(state.neigh.shape[1])
    return dataclasses.replace(base, **overrides)


def _bank_and_graph(settings, state, config):
    """([N, D] float32 bank, [N, k] int32 graph, where they came from)."""
    bank, graph = state.memory_banks, state.neigh
    if bank is None:
        if settings.num_examples < 2:
            raise ImportCheckpointError(
                f"{settings.checkpoint} holds no memory bank: give --num_examples=N, the "
                "training images a continued run will see (random unit rows are made)"
            )
        bank = memory_bank.random_unit_rows(settings.num_examples, config.embedding_dim, 0)
        graph = neighbors.build_knn_graph(bank, config.num_neighbors, config.knn_method)
        return bank, graph.astype(np.int32), "random unit rows (the checkpoint has no bank)"
    if bank.ndim != 2 or bank.shape[1] != config.embedding_dim:
        raise ImportCheckpointError(
            f"{settings.checkpoint}: memory_banks has shape {list(bank.shape)}, not "
            f"[N, {config.embedding_dim}] (the head's output size)"
        )
    if graph is None:
        graph = neighbors.build_knn_graph(
            np.asarray(bank, np.float32), config.num_neighbors, config.knn_method
        )
        return bank, graph.astype(np.int32), "the checkpoint's bank; graph rebuilt from it"
    if graph.ndim != 2 or graph.shape[0] != bank.shape[0] or graph.dtype.kind not in "iu":
        raise ImportCheckpointError(
            f"{settings.checkpoint}: neigh has shape {list(graph.shape)} ({graph.dtype}), not "
            f"[{bank.shape[0]}, k] integers"
        )
    if graph.size and (graph.min() < 0 or graph.max() >= bank.shape[0]):
        raise ImportCheckpointError(
            f"{settings.checkpoint}: neigh holds rows outside [0, {bank.shape[0]}) of the bank"
        )
    return bank, graph, "the checkpoint's memory_banks and neigh"


def _check_new_run(workdir):
    rundir.RunDir.check(workdir)
    if tf.io.gfile.exists(os.path.join(workdir, workdir_lib.FLAGS_FILE)) or (
        workdir_lib.checkpoint_paths(workdir) if tf.io.gfile.isdir(workdir) else []
    ):
        raise ImportCheckpointError(
            f"--workdir={workdir} already holds a run; import into a new folder"
        )


def _bank_variable(bank, rows=1 << 14):
    """A [N, D] float32 variable holding `bank` (a memory-mapped view of the checkpoint), with
    one copy of it in memory: the zeros it starts from are adopted by the variable (traced
    together, the fill's buffer has no other user), then the rows are copied in place chunk by
    chunk, each chunk's file pages released after it."""
    variable = tf.Variable(
        tf.zeros([0, bank.shape[1]]), shape=[None, bank.shape[1]], trainable=False, name="bank"
    )
    tf.function(lambda: variable.assign(tf.zeros(bank.shape)))()
    for start, piece in torch_checkpoint.row_chunks(bank, rows):
        # In place: the op writes the variable's buffer directly (`variable[a:b].assign` would
        # read the variable first, and the read's reference makes the write copy all of it).
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=variable.handle,
            begin=[start, 0],
            end=[start + piece.shape[0], bank.shape[1]],
            strides=[1, 1],
            value=piece.astype(np.float32, copy=False),
        )
    return variable


def _write_checkpoint(config, workdir, encoder, bank, graph, epoch):
    """checkpoints/ckpt-EPOCH with the parts and object names of a training checkpoint."""
    num_rows = int(bank.shape[0])
    steps = epoch * (num_rows // config.batch_size)
    optimizer = keras.optimizers.SGD(
        model_lib.learning_rate_schedule(config, num_rows // config.batch_size),
        momentum=config.optimizer_momentum,
        weight_decay=config.weight_decay or None,
    )
    optimizer.build(encoder.trainable_variables)
    optimizer.iterations.assign(steps)
    # MemoryBank's object layout (a module whose `bank` is the [N, D] variable), without its
    # random initial rows: the bank is the checkpoint's.
    bank_module = tf.Module(name="memory_bank")
    bank_module.bank = _bank_variable(bank)  # [N, D]
    parts = dict(
        encoder=encoder,
        optimizer=optimizer,
        bank=bank_module,
        graph=tf.Variable(graph, trainable=False, name="knn_graph"),
        epoch=tf.Variable(epoch, dtype=tf.int64, trainable=False, name="epoch"),
        step=tf.Variable(steps, dtype=tf.int64, trainable=False, name="steps"),
    )
    # The run folder as training opens it: locked, flags.txt written (a new run), and the
    # checkpoint saved as training saves its epochs (the new run restores nothing).
    with rundir.RunDir.open(config, workdir) as run:
        run.restore(None, **parts)
        return run.save(epoch)


def import_checkpoint(settings):
    """Writes the run folder `settings.workdir` from the PyTorch checkpoint `settings.checkpoint`.

    Args:
      settings: an ImportConfig.

    Returns:
      The record written to WORKDIR/imported.json (origin, architecture, what each key became).

    Raises:
      torch_checkpoint.CheckpointError: the file is unreadable, refused or holds no ResNet.
      ValueError: a bad flag, a workdir that holds a run, a bank or graph of the wrong shape.
    """
    if not settings.checkpoint or not settings.workdir:
        raise ImportCheckpointError("--checkpoint and --workdir are required")
    if settings.normalization not in NORMALIZATION_CHOICES:
        raise ImportCheckpointError(
            f"--normalization={settings.normalization} is not one of "
            f"{', '.join(NORMALIZATION_CHOICES)}"
        )
    _check_new_run(settings.workdir)
    obj, file_format = torch_checkpoint.load(settings.checkpoint)
    state = resnet_keys.resnet_state(obj, settings.checkpoint)
    del obj  # the tensors are views of the file: each storage is unmapped with its last view
    config = _run_config(settings, state)
    bank, graph, bank_origin = _bank_and_graph(settings, state, config)
    graph = np.array(graph, np.int32)  # [N, k], a copy: the file's int64 pages are released
    state.neigh = None
    # Variables do not depend on the image size: the build pass runs on the smallest images
    # the stem takes, not a 224-px forward pass.
    build_size = config_lib.MIN_IMAGE_SIZE if config.encoder.endswith("_cifar") else 32
    encoder = model_lib.encoder_from_config(dataclasses.replace(config, image_size=build_size))
    assign(encoder, state)
    state.weights.clear()  # their file pages go with the views
    epoch = state.epoch or 0
    record = {
        "file": os.path.basename(settings.checkpoint),
        "sha256": torch_checkpoint.sha256(settings.checkpoint),
        "bytes": os.path.getsize(settings.checkpoint),
        "format": {"zip": "zip (torch >= 1.6)", "legacy": "legacy (torch < 1.6)"}[file_format],
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": dataclasses.asdict(state.architecture),
        "description": state.architecture.describe(),
        "normalization": config.normalization,
        "image_size": config.image_size,
        "key_prefix": state.prefix,
        "epoch": epoch,
        "bank": f"{bank.shape[0]} x {bank.shape[1]}, {bank_origin}",
        "graph_neighbors": int(graph.shape[1]),
        "variables": dict(sorted(state.sources.items())),
        "dropped": state.dropped,
        "unmapped": state.unmapped,
        "notes": state.notes,
    }
    path = _write_checkpoint(config, settings.workdir, encoder, bank, graph, epoch)
    record["run_checkpoint"] = os.path.basename(path)
    # An empty metrics.jsonl: no epoch ran here (analyze draws "no metrics yet").
    metrics = os.path.join(settings.workdir, workdir_lib.METRICS_FILE)
    with workdir_lib.writing(metrics, "the metrics"):
        with tf.io.gfile.GFile(metrics, "w") as f:
            f.write("")
    target = os.path.join(settings.workdir, IMPORT_FILE)
    with workdir_lib.writing(target, "the import record"):
        with tf.io.gfile.GFile(target, "w") as f:
            json.dump(record, f, indent=1)
    return record


def read_record(workdir):
    """The imported.json of a run folder; None for a run trained here."""
    path = os.path.join(workdir, IMPORT_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def summary_lines(record, limit=20):
    """What an import did, for the command's output: one line each, every unmapped key named."""
    lines = [
        f"imported {record['file']} ({record['format']}, sha256 {record['sha256']})",
        f"architecture: {record['description']}; input normalisation {record['normalization']}, "
        f"{record['image_size']} px",
        f"variables: {len(record['variables'])} from keys under {record['key_prefix']!r}; "
        f"{len(record['dropped'])} num_batches_tracked key(s) dropped (eval needs none)",
        f"bank: {record['bank']}; graph k={record['graph_neighbors']}; epoch {record['epoch']}",
        f"run checkpoint: {record['run_checkpoint']}",
    ]
    unmapped = record["unmapped"]
    lines.append(
        f"unmapped keys: {len(unmapped)}" + (" (not part of the encoder):" if unmapped else "")
    )
    lines += [f"  {key}" for key in unmapped[:limit]]
    if len(unmapped) > limit:
        lines.append(f"  ... and {len(unmapped) - limit} more, all listed in {IMPORT_FILE}")
    lines += [f"note: {note}" for note in record["notes"]]
    return lines
