"""PyTorch checkpoints without torch: a safe reader and writer of `torch.save` files.

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

`save(obj, path)` writes either format (tests and benchmarks build checkpoints with it);
`sha256(path)` is a file's digest and `row_chunks(array, rows)` copies a memory-mapped bank out
a chunk at a time. `resnet_keys` maps the ResNet of a loaded checkpoint onto the encoder.
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
