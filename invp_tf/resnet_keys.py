"""The key map of PyTorch ResNet state_dicts onto the project's encoder.

`resnet_state(obj)` finds the ResNet in a checkpoint read by `torch_checkpoint.load` (the
authors' dict, a bare state_dict, torchvision's, MoCo's `module.encoder_q.`), infers its
`Architecture` from key names and shapes (`infer_architecture`) and maps every key onto a
variable of `encoder.Encoder` in Keras layout (`key_map`): HWIO kernels, (in, out) dense
weights, BatchNorm's gamma/beta/moving statistics. What it cannot place is named: keys dropped
on purpose, keys of no part of the encoder, and top-level entries other than the bank and the
graph. No TensorFlow and no torch: NumPy arrays in, NumPy arrays out.
"""

import dataclasses
import re

import numpy as np

from invp_tf import torch_checkpoint

# (block, blocks per stage, stem) -> the encoder.BACKBONES name that builds it.
_BACKBONES = {
    ("bottleneck", (3, 4, 6, 3), "imagenet"): "resnet50",
    ("basic", (2, 2, 2, 2), "imagenet"): "resnet18",
    ("basic", (2, 2, 2, 2), "cifar"): "resnet18_cifar",
}
_STAGE_STRIDES = (1, 2, 2, 2)
# The input normalisation each stem was trained with by the authors: ImageNet's mean/std
# (models/resnet.py, as torchvision and MoCo) and CIFAR's for models/resnet_cifar.py.
_STEM_NORMALIZATION = {"imagenet": "imagenet", "cifar": "cifar"}
# torch BatchNorm2d key -> Keras BatchNormalization variable.
_BATCH_NORM = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_NUM_BATCHES = "torch's count of training batches (only its cumulative-average mode reads it)"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The encoder a checkpoint's keys and shapes describe (the flags of encoder.Encoder)."""

    encoder: str  # encoder.BACKBONES
    stem_width: int
    width_multiplier: float
    stage_widths: tuple  # inner channels of each stage's blocks
    head: str  # "linear" or "mlp"
    head_hidden_dim: int  # 0 for a linear head
    embedding_dim: int
    feature_dim: int
    normalization: str  # encoder.NORMALIZATIONS: the one its training used

    def describe(self):
        head = (
            f"Linear({self.feature_dim}, {self.embedding_dim})"
            if self.head == "linear"
            else f"Linear({self.feature_dim}, {self.head_hidden_dim}) - ReLU - "
            f"Linear({self.head_hidden_dim}, {self.embedding_dim})"
        )
        return (
            f"{self.encoder} (stem {self.stem_width} channels, stage widths "
            f"{list(self.stage_widths)}, pooled features {self.feature_dim}), head {head}"
        )


@dataclasses.dataclass
class ResNetState:
    """A checkpoint's ResNet, ready to assign to an encoder.Encoder.

    weights: {variable path below the Encoder, e.g. "backbone/stage1_block1/conv1/conv/kernel":
      float32 array in Keras layout (HWIO kernels, (in, out) dense weights)}.
    sources: {variable path: the checkpoint key it came from}.
    dropped: {checkpoint key: why it has no variable} (known keys deliberately left out).
    unmapped: checkpoint keys that belong to no part of the encoder.
    notes: what else the checkpoint holds and what became of it.
    """

    architecture: Architecture
    prefix: str
    weights: dict
    sources: dict
    dropped: dict
    unmapped: list
    notes: list
    epoch: int | None = None
    memory_banks: np.ndarray | None = None  # [N, D] as saved (a view of the file)
    neigh: np.ndarray | None = None  # [N, k] as saved


def _scaled(channels, width_multiplier):
    # encoder._scaled, repeated here so that this module needs no TensorFlow.
    return max(1, round(channels * width_multiplier))


def _state_dict(obj, path):
    """(state_dict, {top-level key: value} of the rest) of a loaded checkpoint."""
    if not isinstance(obj, dict):
        raise torch_checkpoint.CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict or a checkpoint dict"
        )
    inner = obj.get("state_dict")
    if isinstance(inner, dict):
        return inner, {key: value for key, value in obj.items() if key != "state_dict"}
    return obj, {}


def _find_prefix(state, path):
    """The key prefix of the ResNet ('', 'module.', 'module.encoder_q.', ...)."""
    marker = "layer1.0.conv1.weight"
    prefixes = sorted(
        key[: -len(marker)]
        for key in state
        if isinstance(key, str)
        and key.endswith(marker)
        and key[: -len(marker)] + "conv1.weight" in state
    )
    if len(prefixes) > 1:  # MoCo: the query encoder is the one trained by the loss
        prefixes = [p for p in prefixes if "encoder_q" in p] or prefixes
    if not prefixes:
        shown = ", ".join(str(key) for key in list(state)[:6])
        raise torch_checkpoint.CheckpointError(
            f"{path}: holds no ResNet (no conv1.weight with layer1.0.conv1.weight beside it); "
            f"its keys: {shown}{', ...' if len(state) > 6 else ''}"
        )
    if len(prefixes) > 1:
        raise torch_checkpoint.CheckpointError(
            f"{path}: holds several ResNets ({', '.join(prefixes)}); ambiguous"
        )
    return prefixes[0]


def _shape(state, key):
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, np.ndarray) else None


def infer_architecture(state, path=""):
    """The Architecture of a prefix-free ResNet state_dict, from its key names and shapes.

    Raises:
      torch_checkpoint.CheckpointError: naming what does not fit one of the encoders this
        project builds.
    """
    stem = _shape(state, "conv1.weight")
    if stem is None or len(stem) != 4 or stem[1] != 3 or stem[2] != stem[3]:
        raise torch_checkpoint.CheckpointError(
            f"{path}: conv1.weight has shape {stem}, not [C, 3, k, k]"
        )
    stem_type = {7: "imagenet", 3: "cifar"}.get(stem[2])
    if stem_type is None:
        raise torch_checkpoint.CheckpointError(
            f"{path}: a {stem[2]}x{stem[2]} stem conv; known: 7x7, 3x3"
        )
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depths = []
    for stage in range(1, 5):
        numbers = {
            int(match.group(1))
            for key in state
            if (match := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", str(key)))
        }
        if numbers != set(range(len(numbers))) or not numbers:
            raise torch_checkpoint.CheckpointError(
                f"{path}: layer{stage} has blocks {sorted(numbers)}"
            )
        depths.append(len(numbers))
    name = _BACKBONES.get((block, tuple(depths), stem_type))
    if name is None:
        raise torch_checkpoint.CheckpointError(
            f"{path}: a ResNet of {block} blocks {depths} with the {stem_type} stem; this "
            "project builds ResNet-50 (bottleneck [3, 4, 6, 3]) and ResNet-18 (basic "
            "[2, 2, 2, 2]; ImageNet or CIFAR stem)"
        )
    widths = tuple(int(state[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5))
    multiplier = widths[0] / 64
    if any(_scaled(64 * 2**i, multiplier) != w for i, w in enumerate(widths)):
        raise torch_checkpoint.CheckpointError(
            f"{path}: stage widths {list(widths)} are not 64, 128, 256, 512 times one factor"
        )
    feature_dim = widths[3] * (4 if block == "bottleneck" else 1)
    head = hidden = embedding = None
    for head_name in ("fc", "linear"):
        if _shape(state, f"{head_name}.weight"):
            head, (embedding, width) = "linear", _shape(state, f"{head_name}.weight")
            hidden = 0
        elif _shape(state, f"{head_name}.0.weight") and _shape(state, f"{head_name}.2.weight"):
            head, (hidden, width) = "mlp", _shape(state, f"{head_name}.0.weight")
            embedding, inner = _shape(state, f"{head_name}.2.weight")
            if inner != hidden or f"{head_name}.1.weight" in state:
                raise torch_checkpoint.CheckpointError(
                    f"{path}: {head_name} is not Linear - ReLU - Linear"
                )
        else:
            continue
        if width != feature_dim:
            raise torch_checkpoint.CheckpointError(
                f"{path}: the head {head_name} takes {width} features, the backbone gives "
                f"{feature_dim}"
            )
        break
    if head is None:
        raise torch_checkpoint.CheckpointError(
            f"{path}: no head (fc.weight, fc.0/fc.2 or linear.*): the embedding cannot be built"
        )
    return Architecture(
        encoder=name,
        stem_width=int(stem[0]),
        width_multiplier=multiplier,
        stage_widths=widths,
        head=head,
        head_hidden_dim=int(hidden),
        embedding_dim=int(embedding),
        feature_dim=int(feature_dim),
        normalization=_STEM_NORMALIZATION[stem_type],
    )


def key_map(architecture, head_name="fc", shortcut_name="downsample"):
    """{checkpoint key (no prefix): (variable path, layout) or (None, why it is dropped)}.

    Layout: "conv" (OIHW -> HWIO), "dense" ((out, in) -> (in, out)) or "" (as is). Paths are
    below encoder.Encoder: backbone/stem_conv/conv/kernel, backbone/stage1_block1/bn1/gamma,
    head/fc/kernel, ...
    """
    mapping = {}

    def conv(key, layer):
        mapping[f"{key}.weight"] = (f"{layer}/conv/kernel", "conv")

    def batch_norm(key, layer):
        for torch_name, keras_name in _BATCH_NORM.items():
            mapping[f"{key}.{torch_name}"] = (f"{layer}/{keras_name}", "")
        mapping[f"{key}.num_batches_tracked"] = (None, _NUM_BATCHES)

    conv("conv1", "backbone/stem_conv")
    batch_norm("bn1", "backbone/stem_bn")
    bottleneck = architecture.encoder == "resnet50"
    expansion, convs = (4, 3) if bottleneck else (1, 2)
    depths = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
    in_channels = architecture.stem_width
    for stage, (depth, stride) in enumerate(zip(depths, _STAGE_STRIDES, strict=True), 1):
        out_channels = architecture.stage_widths[stage - 1] * expansion
        for index in range(depth):
            key, layer = f"layer{stage}.{index}", f"backbone/stage{stage}_block{index + 1}"
            for number in range(1, convs + 1):
                conv(f"{key}.conv{number}", f"{layer}/conv{number}")
                batch_norm(f"{key}.bn{number}", f"{layer}/bn{number}")
            if (stride if index == 0 else 1) != 1 or in_channels != out_channels:
                conv(f"{key}.{shortcut_name}.0", f"{layer}/downsample_conv")
                batch_norm(f"{key}.{shortcut_name}.1", f"{layer}/downsample_bn")
            in_channels = out_channels
    if architecture.head == "linear":
        mapping[f"{head_name}.weight"] = ("head/fc/kernel", "dense")
        mapping[f"{head_name}.bias"] = ("head/fc/bias", "")
    else:
        for number, layer in ((0, "fc1"), (2, "fc")):
            mapping[f"{head_name}.{number}.weight"] = (f"head/{layer}/kernel", "dense")
            mapping[f"{head_name}.{number}.bias"] = (f"head/{layer}/bias", "")
    return mapping


_LAYOUTS = {"conv": (2, 3, 1, 0), "dense": (1, 0), "": None}


def resnet_state(obj, path=""):
    """Finds, checks and maps the ResNet of a loaded checkpoint (see `torch_checkpoint.load`).

    Reads the authors' {'epoch', 'state_dict', 'optimizer', 'memory_banks', 'neigh'} (with or
    without nn.DataParallel's `module.`), bare state_dicts (torchvision's ResNet-18/50
    included) and MoCo's (`module.encoder_q.`; the key encoder and the queue are not part of
    the encoder and are listed as unmapped).

    Returns:
      ResNetState.

    Raises:
      torch_checkpoint.CheckpointError: no ResNet, a ResNet this project does not build, a key
        missing or of another shape than its architecture needs.
    """
    state, rest = _state_dict(obj, path)
    prefix = _find_prefix(state, path)
    inner = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    architecture = infer_architecture(inner, path)
    head_name = "fc" if any(key.startswith("fc.") for key in inner) else "linear"
    shortcut_name = "shortcut" if any(".shortcut." in key for key in inner) else "downsample"
    mapping = key_map(architecture, head_name, shortcut_name)
    missing = [prefix + key for key in mapping if key not in inner]
    if missing:
        raise torch_checkpoint.CheckpointError(
            f"{path}: the {architecture.encoder} its keys describe lacks {len(missing)} key(s): "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
        )
    weights, sources, dropped = {}, {}, {}
    for key, (variable, layout) in mapping.items():
        if variable is None:
            dropped[prefix + key] = layout
            continue
        value = inner[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise torch_checkpoint.CheckpointError(
                f"{path}: {prefix + key} is not a floating-point tensor"
            )
        axes = _LAYOUTS[layout]
        weights[variable] = np.asarray(value if axes is None else value.transpose(axes), np.float32)
        sources[variable] = prefix + key
    unmapped = [
        key for key in state if not (key.startswith(prefix) and key[len(prefix) :] in mapping)
    ]
    notes = []
    if "optimizer" in rest:
        notes.append(
            "optimizer: ignored (its momentum buffers are not carried over; continued training "
            "starts SGD's momentum at zero)"
        )
    epoch = rest.get("epoch")
    bank, graph = rest.get("memory_banks"), rest.get("neigh")
    known = {"optimizer", "epoch", "memory_banks", "neigh"}
    for key in rest:
        if key not in known:
            notes.append(f"{key}: ignored (not part of the encoder, bank or graph)")
    return ResNetState(
        architecture=architecture,
        prefix=prefix,
        weights=weights,
        sources=sources,
        dropped=dropped,
        unmapped=unmapped,
        notes=notes,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        memory_banks=bank if isinstance(bank, np.ndarray) else None,
        neigh=graph if isinstance(graph, np.ndarray) else None,
    )
