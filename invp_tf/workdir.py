"""A run's work directory: flags.txt and checkpoints, restored without absl.

`train` writes runs; the analysis, evaluation and export entry points read them
through `load_run`, so none of them has to import train's flags.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from invp_tf import config as config_lib
from invp_tf import encoder as encoder_lib


def encoder_from_config(config, sync_batchnorm=False):
    """The run's encoder, variables built (weights still to be restored).

    sync_batchnorm: global-batch BatchNorm statistics (training under several
    replicas); inference, evaluation and export never need it.
    """
    return encoder_lib.build_encoder(
        config.encoder,
        head=config.head,
        embedding_dim=config.embedding_dim,
        width_multiplier=config.width_multiplier,
        sync_batchnorm=sync_batchnorm,
        image_size=config.image_size,
    )


@dataclasses.dataclass
class Run:
    """A finished or running training run, restored from its work directory."""

    config: config_lib.Config
    encoder: keras.Model
    bank: np.ndarray  # [N, D] memory bank
    knn_graph: np.ndarray  # [N, k] int32, the graph of the last epoch that used L_inv
    epoch: int  # epochs completed


def load_run(workdir):
    """Restores encoder, bank and graph of the latest checkpoint in `workdir`.

    Raises:
      FileNotFoundError: no flags.txt or no checkpoint in `workdir`.
    """
    flagfile = os.path.join(workdir, "flags.txt")
    if not tf.io.gfile.exists(flagfile):
        raise FileNotFoundError(f"{workdir} is not a training run: no flags.txt")
    path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
    config = config_lib.Config.from_flagfile(flagfile)
    encoder = encoder_from_config(config)
    reader = tf.train.load_checkpoint(path)
    shapes = reader.get_variable_to_shape_map()
    bank_key = next((k for k in shapes if k.startswith("bank/") and "OPTIMIZER" not in k), None)
    graph_key = next((k for k in shapes if k.startswith("graph/") and "OPTIMIZER" not in k), None)
    if bank_key is None or graph_key is None:
        raise ValueError(f"{path} is not an invp_tf training checkpoint (no bank or graph)")
    epoch = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(encoder=encoder, epoch=epoch).restore(path).expect_partial()
    return Run(
        config, encoder, reader.get_tensor(bank_key), reader.get_tensor(graph_key), int(epoch)
    )
