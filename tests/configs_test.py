"""Every recipe in configs/ opens with its header and parses into a valid Config."""

import dataclasses
import glob
import os
import sys

import pytest
from absl import flags

from invp_tf import config as config_lib
from invp_tf import losses
from invp_tf import rundir
from invp_tf import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.flags")))


def test_the_required_recipes_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"r50.flags", "r50_mlp.flags", "cifar10_r18.flags", "fashion_mnist.flags"} <= names
    assert len([n for n in names if n.startswith("ablation_")]) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_recipe_header_and_flags(path, monkeypatch):
    with open(path) as f:
        header = [line for line in f.read().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    for part in ("Command:", "Data:", "Expected result", "Runtime:"):
        assert part in text, f"{os.path.basename(path)} header lacks {part!r}"
    assert f"--flagfile=configs/{os.path.basename(path)}" in text
    monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repo root
    try:
        flags.FLAGS([sys.argv[0], f"--flagfile={path}", "--workdir=/tmp/x"])
        config = train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    for name, choices in config_lib.CHOICES.items():
        assert getattr(config, name) in choices


def test_config_holds_its_loss_settings_as_one_loss_config():
    config = config_lib.Config(temperature=0.2, num_background=64, background="exact")
    loss = config.loss
    assert type(loss) is losses.LossConfig
    assert (loss.temperature, loss.num_background, loss.background) == (0.2, 64, "exact")
    assert loss == losses.LossConfig(temperature=0.2, num_background=64, background="exact")
    # Every loss setting is a train flag: the flag set of a Config includes them.
    names = {field.name for field in dataclasses.fields(config_lib.Config)}
    assert {field.name for field in dataclasses.fields(losses.LossConfig)} <= names


def test_safe_to_change_is_the_fields_marked_so():
    assert list(rundir.SAFE_TO_CHANGE) == [
        "workdir",
        "epochs",
        "knn_k",
        "knn_temperature",
        "knn_features",
        "eval_every",
        "jit_compile",
        "strategy",
        "tpu",
        "cpu_devices",
        "device_memory_gb",
        "dry_run",
    ]
    assert rundir.SAFE_TO_CHANGE["knn_k"] == "kNN monitor only"
