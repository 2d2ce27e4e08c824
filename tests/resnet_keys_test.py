"""resnet_keys: the architecture read from a checkpoint's keys and the key map onto the encoder."""

import collections
import json
import pathlib

import numpy as np
import pytest

from invp_tf import resnet_keys
from invp_tf import torch_checkpoint as tc

DATA = pathlib.Path(__file__).parent / "data" / "authors_checkpoints"
MANIFESTS = json.loads((DATA / "full_size_state_dict_shapes.json").read_text())


def test_a_torch_file_without_a_resnet_is_one_line(tmp_path):
    path = tmp_path / "mlp.pth"
    tc.save({"state_dict": {"weight": np.zeros((3, 2), np.float32)}}, path)
    obj, _ = tc.load(path)
    with pytest.raises(tc.CheckpointError, match="holds no ResNet") as error:
        resnet_keys.resnet_state(obj, str(path))
    assert "\n" not in str(error.value)
    with pytest.raises(tc.CheckpointError, match="not a state_dict"):
        resnet_keys.resnet_state([1, 2], "list.pth")


def _random_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        (
            key,
            np.array(123, np.int64)
            if key.endswith("num_batches_tracked")
            else rng.standard_normal(shape).astype(np.float32),
        )
        for key, shape in shapes.items()
    )


@pytest.mark.parametrize(
    "manifest, encoder, head, hidden, feature_dim",
    [
        ("resnet50_linear", "resnet50", "linear", 0, 2048),
        ("resnet50_mlp", "resnet50", "mlp", 2048, 2048),
        ("resnet18_cifar_mlp", "resnet18_cifar", "mlp", 512, 512),
    ],
)
def test_every_key_of_the_full_size_manifests_is_mapped(
    manifest, encoder, head, hidden, feature_dim
):
    state = _random_state(MANIFESTS[manifest])
    mapped = resnet_keys.resnet_state({"epoch": 1, "state_dict": state}, manifest)
    architecture = mapped.architecture
    assert (architecture.encoder, architecture.head, architecture.head_hidden_dim) == (
        encoder,
        head,
        hidden,
    )
    assert architecture.feature_dim == feature_dim and architecture.stem_width == 64
    assert architecture.width_multiplier == 1.0 and architecture.embedding_dim == 128
    assert architecture.normalization == ("cifar" if "cifar" in manifest else "imagenet")
    assert mapped.prefix == "module."
    assert mapped.unmapped == []
    assert set(mapped.sources.values()) | set(mapped.dropped) == set(state)
    assert all(key.endswith("num_batches_tracked") for key in mapped.dropped)
    # Every value in Keras layout: OIHW -> HWIO kernels, (out, in) -> (in, out) dense.
    for path, key in mapped.sources.items():
        value = state[key]
        if path.endswith("conv/kernel"):
            want = value.transpose(2, 3, 1, 0)
        elif path.endswith("kernel"):
            want = value.T
        else:
            want = value
        np.testing.assert_array_equal(mapped.weights[path], want, err_msg=key)


def test_moco_and_unmapped_keys_are_named():
    shapes = MANIFESTS["resnet50_mlp"]
    state = collections.OrderedDict()
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        for key, value in _random_state(shapes).items():
            state[prefix + key[len("module.") :]] = value
    state["module.queue"] = np.zeros((128, 16), np.float32)
    state["module.queue_ptr"] = np.zeros([1], np.int64)
    mapped = resnet_keys.resnet_state(
        {"epoch": 200, "arch": "resnet50", "state_dict": state}, "moco"
    )
    assert mapped.prefix == "module.encoder_q."
    assert mapped.architecture.head == "mlp" and mapped.architecture.head_hidden_dim == 2048
    encoder_k = [key for key in state if key.startswith("module.encoder_k.")]
    assert mapped.unmapped == encoder_k + ["module.queue", "module.queue_ptr"]
    assert any(note.startswith("arch:") for note in mapped.notes)
    assert mapped.epoch == 200 and mapped.memory_banks is None


def _torchvision_shapes(blocks, bottleneck, classes=1000):
    """The keys and shapes of torchvision's resnet18 / resnet50 state_dict."""
    shapes = {"conv1.weight": [64, 3, 7, 7]}

    def bn(key, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{name}"] = [channels]
        shapes[f"{key}.num_batches_tracked"] = []

    bn("bn1", 64)
    in_channels, expansion = 64, 4 if bottleneck else 1
    for stage, depth in enumerate(blocks, 1):
        width = 64 * 2 ** (stage - 1)
        for index in range(depth):
            key = f"layer{stage}.{index}"
            if bottleneck:
                convs = [[width, in_channels, 1, 1], [width, width, 3, 3], [width * 4, width, 1, 1]]
            else:
                convs = [[width, in_channels, 3, 3], [width, width, 3, 3]]
            for number, shape in enumerate(convs, 1):
                shapes[f"{key}.conv{number}.weight"] = shape
                bn(f"{key}.bn{number}", shape[0])
            if index == 0 and (stage > 1 or in_channels != width * expansion):
                shapes[f"{key}.downsample.0.weight"] = [width * expansion, in_channels, 1, 1]
                bn(f"{key}.downsample.1", width * expansion)
            in_channels = width * expansion
    shapes["fc.weight"] = [classes, in_channels]
    shapes["fc.bias"] = [classes]
    return shapes


@pytest.mark.parametrize(
    "blocks, bottleneck, encoder",
    [((2, 2, 2, 2), False, "resnet18"), ((3, 4, 6, 3), True, "resnet50")],
)
def test_torchvision_bare_state_dicts(blocks, bottleneck, encoder):
    state = _random_state(_torchvision_shapes(blocks, bottleneck))
    mapped = resnet_keys.resnet_state(state, "torchvision.pth")
    assert mapped.prefix == "" and mapped.unmapped == [] and mapped.notes == []
    assert mapped.architecture.encoder == encoder
    assert mapped.architecture.head == "linear" and mapped.architecture.embedding_dim == 1000
    assert mapped.epoch is None and mapped.memory_banks is None


def test_a_resnet_this_project_does_not_build_is_named():
    state = _random_state(_torchvision_shapes((3, 4, 6, 3), False))  # ResNet-34
    with pytest.raises(tc.CheckpointError, match=r"basic blocks \[3, 4, 6, 3\]"):
        resnet_keys.resnet_state(state, "r34.pth")
    state = _random_state(MANIFESTS["resnet50_linear"])
    del state["module.layer2.0.downsample.1.running_var"]
    with pytest.raises(tc.CheckpointError, match="layer2.0.downsample.1.running_var"):
        resnet_keys.resnet_state(state, "cut.pth")


def test_the_fixtures_architecture_is_read_from_the_keys():
    for name, head, hidden in [
        ("resnet50_w0125_linear", "linear", 0),
        ("resnet50_w0125_mlp", "mlp", 2048),
    ]:
        obj, _ = tc.load(DATA / f"{name}.pth")
        mapped = resnet_keys.resnet_state(obj, name)
        architecture = mapped.architecture
        # The authors' width 0.125 scales the stages only: the stem keeps 64 channels.
        assert architecture.stem_width == 64 and architecture.width_multiplier == 0.125
        assert architecture.stage_widths == (8, 16, 32, 64) and architecture.feature_dim == 256
        assert (architecture.head, architecture.head_hidden_dim) == (head, hidden)
        assert any("optimizer: ignored" in note for note in mapped.notes)
        assert mapped.unmapped == [] and mapped.epoch == 7
