"""SHA-256 of files, read in blocks (no TensorFlow import: kernels.py uses it before the
native library is loaded)."""

import hashlib

_BLOCK = 1 << 20


def update_with_file(digest, path):
    """Feeds the bytes of the file `path` to the hashlib object `digest`; returns it."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest


def file_sha256(path):
    """The hex SHA-256 of the file `path`."""
    return update_with_file(hashlib.sha256(), path).hexdigest()
