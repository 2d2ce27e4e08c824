"""PyTorch checkpoints without torch: a safe reader and writer of `torch.save` files, and the
key map of the authors' ResNets (and torchvision's and MoCo's) onto this project's encoder.

`load(path)` reads both formats `torch.save` writes:
  - zip (torch >= 1.6): `NAME/data.pkl` (the object) and `NAME/data/KEY` (raw storages);
  - legacy (torch < 1.6): five pickles and raw storages in one stream: the magic number, the
    protocol version, sys_info, the object (storages as persistent ids), the storage keys; then
    per key its element count (int64) and its bytes.
A checkpoint is a pickle, and unpickling runs whatever callable the file names. The unpickler
here resolves only the names in ALLOWED_GLOBALS (tensor and storage rebuilding, OrderedDict,
the plain builtins) to functions of this module that build NumPy arrays; any other name stops
the read with one line naming it, before anything is called. Storages are memory-mapped, not
read: a tensor is a NumPy view of the file (strides and offset honoured), so a large bank
costs memory only when it is copied.

`resnet_state(obj)` finds the ResNet in a loaded checkpoint (the authors' dict, a bare
state_dict, torchvision's, MoCo's `module.encoder_q.`), infers its architecture from key names
and shapes and maps every key onto a variable of `encoder.Encoder`; `save(obj, path)` writes
either format (tests and benchmarks build checkpoints with it).
"""

import collections
import dataclasses
import hashlib
import io
import mmap
import os
import pickle
import re
import struct
import zipfile

import numpy as np

# Legacy format: the first pickle is this number, the second the protocol version.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
FORMATS = ("zip", "legacy")
# Storages of this many bytes or more are memory-mapped (a bank of 1.28M rows costs memory
# only when copied); smaller ones are read, so that a checkpoint of a thousand small tensors
# does not hold a thousand file descriptors.
MAPPED_BYTES = 1 << 20

# torch storage class -> element dtype (little-endian unless the file says otherwise).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_BUILTINS = ("dict", "list", "tuple", "int", "float", "complex", "bool", "str")
# Everything a checkpoint's pickle may name: tensors, storages, containers and plain values.
ALLOWED_GLOBALS = frozenset(
    [
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        *(("torch", name) for name in STORAGE_DTYPES),
        *((module, name) for module in ("builtins", "__builtin__") for name in _BUILTINS),
    ]
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or mapped, in one line naming the file and the problem."""


# ---------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What the pickle's `torch.FloatStorage` (etc.) resolves to: a name and a dtype only."""

    name: str

    @property
    def dtype(self):
        return np.dtype(STORAGE_DTYPES[self.name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """torch._utils._rebuild_tensor(_v2): a read-only NumPy view [size] of a 1-D storage."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f"a tensor of size {size} and stride {stride}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
    if offset < 0 or (0 not in size and last >= storage.shape[0]):
        raise pickle.UnpicklingError(
            f"a tensor of size {size} at offset {offset} outside its storage of "
            f"{storage.shape[0]} elements"
        )
    base = storage[offset:]
    if 0 in size:
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=[s * item for s in stride], writeable=False
    )
    return view


def _rebuild_parameter(data, *_):
    return data  # an nn.Parameter is its tensor here


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_RESOLVED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Refused(pickle.UnpicklingError):
    """The pickle named a global outside ALLOWED_GLOBALS."""


class _Unpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS; storages come from `storage(type, key, numel)`."""

    def __init__(self, file, storage):
        super().__init__(file)
        self._storage = storage

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(f"{module}.{name}")
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module in ("builtins", "__builtin__"):
            return {
                "dict": dict,
                "list": list,
                "tuple": tuple,
                "int": int,
                "float": float,
                "complex": complex,
                "bool": bool,
                "str": str,
            }[name]
        return _RESOLVED[(module, name)]

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel); legacy: the same + view_metadata.
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(f"an unknown persistent id {str(pid)[:80]}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("a legacy storage view (torch < 0.4) is not supported")
        return self._storage(pid[1].dtype, pid[2], pid[4])


def _unpickle(path, data, storage, unpickler=None):
    unpickler = unpickler or _Unpickler
    try:
        return unpickler(io.BytesIO(data) if isinstance(data, bytes) else data, storage).load()
    except _Refused as e:
        raise CheckpointError(
            f"{path}: refused: its pickle asks for {e}, which is not a tensor, a storage or a "
            "plain container; nothing was run (only tensors, storages, dicts, lists, tuples, "
            "numbers, strings, bools and None are read)"
        ) from None
    except CheckpointError:
        raise
    except EOFError:
        raise CheckpointError(f"{path}: truncated (the pickle ends early)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from None


def _mapped(path, offset, dtype, numel, file_size, what):
    """[numel] of `dtype` at byte `offset` of the file (read-only): memory-mapped from
    MAPPED_BYTES on (each map holds a file descriptor), read below."""
    end = offset + numel * dtype.itemsize
    if end > file_size:
        raise CheckpointError(
            f"{path}: truncated: {what} ends at byte {end}, the file has {file_size} bytes"
        )
    if numel * dtype.itemsize < MAPPED_BYTES:
        array = np.fromfile(path, dtype=dtype, count=numel, offset=offset)
        array.flags.writeable = False
        return array
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(numel,))


def _load_zip(path, file_size):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: truncated or damaged torch zip checkpoint ({e}); download it again"
        ) from None
    with archive:
        names = archive.namelist()
        pickles = [name for name in names if re.fullmatch(r"[^/]+/data\.pkl", name)]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: a zip file, but not a PyTorch checkpoint (no NAME/data.pkl inside)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        infos = {info.filename: info for info in archive.infolist()}

        def storage(dtype, key, numel):
            dtype = dtype.newbyteorder("<" if byteorder == "little" else ">")
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CheckpointError(f"{path}: storage {key} is missing from the archive")
            if info.file_size < numel * dtype.itemsize:
                raise CheckpointError(
                    f"{path}: storage {key} holds {info.file_size} bytes, its tensor needs "
                    f"{numel * dtype.itemsize}"
                )
            if info.compress_type != zipfile.ZIP_STORED:  # re-zipped: read it (not mapped)
                return np.frombuffer(archive.read(info), dtype, count=numel)
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: damaged zip entry of storage {key}")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_length + extra_length
            return _mapped(path, offset, dtype, numel, file_size, f"storage {key}")

        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: truncated or damaged ({e})") from None
        return _unpickle(path, data, storage)


def _load_legacy(path, file_size):
    with open(path, "rb") as f:
        no_storage = lambda *a: None  # noqa: E731 (the header pickles hold no tensor)
        header = [_unpickle(path, f, no_storage) for _ in range(2)]  # two plain integers
        if header != [LEGACY_MAGIC, LEGACY_PROTOCOL]:
            raise CheckpointError(
                f"{path}: legacy torch format with protocol {header[1]}, not {LEGACY_PROTOCOL}"
            )
        sys_info = _unpickle(path, f, no_storage)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: a big-endian or unknown legacy checkpoint")
        requested = {}  # key -> (dtype, numel) of every storage the object refers to

        def placeholder(dtype, key, numel):
            requested.setdefault(key, (dtype, numel))
            return _Pending(key)

        obj = _unpickle(path, f, placeholder, _LegacyUnpickler)
        keys = _unpickle(path, f, no_storage)
        if not isinstance(keys, list) or set(keys) != set(requested):
            raise CheckpointError(f"{path}: its storage keys do not match its tensors")
        offset, storages = f.tell(), {}
        for key in keys:
            f.seek(offset)
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", raw)
            dtype, wanted = requested[key]
            if numel < wanted:
                raise CheckpointError(f"{path}: storage {key} has {numel} elements, not {wanted}")
            storages[key] = _mapped(path, offset + 8, dtype, numel, file_size, f"storage {key}")
            offset += 8 + numel * dtype.itemsize
    return _resolve(obj, storages)


class _Pending:
    """A legacy storage whose bytes come after the object pickle: resolved by `_resolve`."""

    def __init__(self, key):
        self.key = key


def _resolve(obj, storages):
    """Replaces the legacy tensors' pending storages by the mapped ones."""
    if isinstance(obj, _PendingTensor):
        return _rebuild_tensor(storages[obj.storage.key], *obj.args)
    if isinstance(obj, dict):
        resolved = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            resolved[key] = _resolve(value, storages)
        return resolved
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(value, storages) for value in obj)
    return obj


@dataclasses.dataclass
class _PendingTensor:
    storage: _Pending
    args: tuple


class _LegacyUnpickler(_Unpickler):
    """Legacy tensors wait for their storages, which follow the object pickle."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if found is _rebuild_tensor:
            return _defer_tensor
        return found


def _defer_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Pending):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    return _PendingTensor(storage, (storage_offset, size, stride))


def load(path):
    """Reads a `torch.save` file (zip or legacy format) into Python objects and NumPy arrays.

    Args:
      path: the checkpoint file.

    Returns:
      (obj, format): the saved object, tensors as read-only NumPy arrays (memory-mapped views of
      the file), and "zip" or "legacy".

    Raises:
      CheckpointError: missing, truncated or not a torch file, or its pickle names a global
        outside ALLOWED_GLOBALS (refused before anything is called).
    """
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _load_zip(path, file_size), "zip"
    # pickle protocol 2, then LONG1 of 10 bytes: the legacy magic number.
    if head[:4] == b"\x80\x02\x8a\x0a" and head[4:14] == LEGACY_MAGIC.to_bytes(10, "little"):
        return _load_legacy(path, file_size), "legacy"
    if not head:
        raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (neither torch's zip format nor its legacy pickle "
        f"format; it starts with {head[:8]!r})"
    )


def sha256(path, chunk=1 << 24):
    """The SHA-256 of a file, hex (read in chunks: checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Writing (tests and benchmarks: checkpoints in torch's formats without torch).

_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in STORAGE_DTYPES.items()}


class _Emitter:
    """Pickle protocol 2 opcodes for the values a checkpoint holds; arrays become tensors.

    Written by hand because the globals torch's pickles name (torch._utils._rebuild_tensor_v2,
    torch.FloatStorage) cannot be imported without torch.
    """

    def __init__(self, legacy):
        self.legacy = legacy
        self.out = io.BytesIO()
        self.arrays = []  # the tensors' storages, in key order ("0", "1", ...)

    def dump(self, obj):
        self.out.write(b"\x80\x02")
        self._value(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def _global(self, module, name):
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _value(self, obj):  # noqa: C901 (one branch per type)
        w = self.out.write
        if obj is None:
            w(b"N")
        elif isinstance(obj, bool | np.bool_):
            w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int | np.integer):
            obj = int(obj)
            if 0 <= obj < 256:
                w(b"K" + bytes([obj]))
            elif -(2**31) <= obj < 2**31:
                w(b"J" + struct.pack("<i", obj))
            else:
                data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                w(b"\x8a" + bytes([len(data)]) + data)
        elif isinstance(obj, float | np.floating):
            w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self._global("collections", "OrderedDict")
                w(b")R")
            else:
                w(b"}")
            if obj:
                w(b"(")
                for key, value in obj.items():
                    self._value(key)
                    self._value(value)
                w(b"u")
        elif isinstance(obj, list):
            w(b"]")
            if obj:
                w(b"(")
                for value in obj:
                    self._value(value)
                w(b"e")
        elif isinstance(obj, tuple):
            w(b"(")
            for value in obj:
                self._value(value)
            w(b"t")
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a torch checkpoint")

    def _tensor(self, array):
        name = _STORAGE_NAMES.get(array.dtype.newbyteorder("="))
        if name is None:
            raise TypeError(f"no torch storage for dtype {array.dtype}")
        strides = tuple(s // array.itemsize for s in array.strides)
        if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
            storage = array.ravel(order="F")  # a transposed tensor: its storage and strides
        else:
            if not array.flags.c_contiguous:  # (np.ascontiguousarray makes 0-d arrays 1-d)
                array = array.copy(order="C")
            storage = array
            strides = tuple(s // array.itemsize for s in array.strides)
        key = str(len(self.arrays))
        self.arrays.append(storage)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"(")
        # The storage's persistent id: ('storage', type, key, location, numel[, view]).
        self.out.write(b"(")
        self._value("storage")
        self._global("torch", name)
        for value in (key, "cpu", int(array.size)):
            self._value(value)
        if self.legacy:
            self._value(None)
        self.out.write(b"tQ")
        for value in (0, tuple(array.shape), strides, False):
            self._value(value)
        self._global("collections", "OrderedDict")
        self.out.write(b")R")  # backward_hooks
        self.out.write(b"tR")


def _chunks(array, size=1 << 26):
    """The bytes of a C-contiguous array (little-endian), in pieces, without one big copy."""
    flat = array.reshape(-1).view(np.uint8) if array.size else np.zeros([0], np.uint8)
    for start in range(0, flat.shape[0], size):
        yield memoryview(flat[start : start + size])


def save(obj, path, format="zip", alignment=64):
    """Writes `obj` (dicts, OrderedDicts, lists, tuples, numbers, strings, None and NumPy
    arrays, which become tensors) as `torch.save` would, in its zip or legacy format.

    Args:
      obj: the object.
      path: the file to write.
      format: "zip" (torch >= 1.6) or "legacy" (torch < 1.6).
      alignment: zip only: storages start at a multiple of this byte offset, as torch's do.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    emitter = _Emitter(legacy=format == "legacy")
    data = emitter.dump(obj)
    if format == "legacy":
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC, LEGACY_PROTOCOL):
                f.write(_Emitter(True).dump(header))
            sys_info = {
                "protocol_version": LEGACY_PROTOCOL,
                "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4},
            }
            f.write(_Emitter(True).dump(sys_info))
            f.write(data)
            f.write(_Emitter(True).dump([str(i) for i in range(len(emitter.arrays))]))
            for array in emitter.arrays:
                f.write(struct.pack("<q", array.size))
                for piece in _chunks(array.astype(array.dtype.newbyteorder("<"), copy=False)):
                    f.write(piece)
        return
    name = os.path.splitext(os.path.basename(path))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        records = [("data.pkl", data), ("byteorder", b"little"), ("version", b"3\n")]
        for entry, payload in records:
            archive.writestr(zipfile.ZipInfo(f"{name}/{entry}", (1980, 1, 1, 0, 0, 0)), payload)
        for key, array in enumerate(emitter.arrays):
            info = zipfile.ZipInfo(f"{name}/data/{key}", (1980, 1, 1, 0, 0, 0))
            large = array.nbytes >= 2**31
            start = archive.fp.tell() + 30 + len(info.filename.encode()) + (20 if large else 0)
            pad = -(start + 4) % alignment  # a 4-byte extra header, then `pad` bytes
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            with archive.open(info, "w", force_zip64=large) as f:
                for piece in _chunks(array.astype(array.dtype.newbyteorder("<"), copy=False)):
                    f.write(piece)


# ---------------------------------------------------------------------------
# The ResNet inside a checkpoint, mapped onto encoder.Encoder's variables.

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
        raise CheckpointError(
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
        raise CheckpointError(
            f"{path}: holds no ResNet (no conv1.weight with layer1.0.conv1.weight beside it); "
            f"its keys: {shown}{', ...' if len(state) > 6 else ''}"
        )
    if len(prefixes) > 1:
        raise CheckpointError(f"{path}: holds several ResNets ({', '.join(prefixes)}); ambiguous")
    return prefixes[0]


def _shape(state, key):
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, np.ndarray) else None


def infer_architecture(state, path=""):
    """The Architecture of a prefix-free ResNet state_dict, from its key names and shapes.

    Raises:
      CheckpointError: naming what does not fit one of the encoders this project builds.
    """
    stem = _shape(state, "conv1.weight")
    if stem is None or len(stem) != 4 or stem[1] != 3 or stem[2] != stem[3]:
        raise CheckpointError(f"{path}: conv1.weight has shape {stem}, not [C, 3, k, k]")
    stem_type = {7: "imagenet", 3: "cifar"}.get(stem[2])
    if stem_type is None:
        raise CheckpointError(f"{path}: a {stem[2]}x{stem[2]} stem conv; known: 7x7, 3x3")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depths = []
    for stage in range(1, 5):
        numbers = {
            int(match.group(1))
            for key in state
            if (match := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", str(key)))
        }
        if numbers != set(range(len(numbers))) or not numbers:
            raise CheckpointError(f"{path}: layer{stage} has blocks {sorted(numbers)}")
        depths.append(len(numbers))
    name = _BACKBONES.get((block, tuple(depths), stem_type))
    if name is None:
        raise CheckpointError(
            f"{path}: a ResNet of {block} blocks {depths} with the {stem_type} stem; this "
            "project builds ResNet-50 (bottleneck [3, 4, 6, 3]) and ResNet-18 (basic "
            "[2, 2, 2, 2]; ImageNet or CIFAR stem)"
        )
    widths = tuple(int(state[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5))
    multiplier = widths[0] / 64
    if any(_scaled(64 * 2**i, multiplier) != w for i, w in enumerate(widths)):
        raise CheckpointError(
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
                raise CheckpointError(f"{path}: {head_name} is not Linear - ReLU - Linear")
        else:
            continue
        if width != feature_dim:
            raise CheckpointError(
                f"{path}: the head {head_name} takes {width} features, the backbone gives "
                f"{feature_dim}"
            )
        break
    if head is None:
        raise CheckpointError(
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
    """Finds, checks and maps the ResNet of a loaded checkpoint (see `load`).

    Reads the authors' {'epoch', 'state_dict', 'optimizer', 'memory_banks', 'neigh'} (with or
    without nn.DataParallel's `module.`), bare state_dicts (torchvision's ResNet-18/50
    included) and MoCo's (`module.encoder_q.`; the key encoder and the queue are not part of
    the encoder and are listed as unmapped).

    Returns:
      ResNetState.

    Raises:
      CheckpointError: no ResNet, a ResNet this project does not build, a key missing or of
        another shape than its architecture needs.
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
        raise CheckpointError(
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
            raise CheckpointError(f"{path}: {prefix + key} is not a floating-point tensor")
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


def row_chunks(array, rows):
    """Yields (start, copy of array[start:start + rows]) over axis 0; for a memory-mapped
    array the file's pages of each chunk are released after it (a large bank is read once,
    never resident whole)."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    backing = getattr(base, "_mmap", None)  # numpy keeps the mmap.mmap of a memmap here
    for start in range(0, array.shape[0], rows):
        piece = np.array(array[start : start + rows])
        yield start, piece
        if backing is not None and piece.size and array.flags.c_contiguous:
            first = array[start : start + rows]
            begin = first.ctypes.data - np.frombuffer(backing, np.uint8, count=1).ctypes.data
            end = begin + first.nbytes
            page = mmap.PAGESIZE
            aligned = begin - begin % page
            backing.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
