"""Tests for invp_tf.digests against hashlib on the whole bytes."""

import hashlib

from invp_tf import digests


def test_file_sha256_spans_blocks(tmp_path):
    data = bytes(range(256)) * 5000 + b"tail"  # more than one 1 MiB block, not a multiple
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert digests.file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digests.file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_update_with_file_continues_a_digest(tmp_path):
    path = tmp_path / "part"
    path.write_bytes(b"second")
    digest = hashlib.sha256(b"first")
    assert digests.update_with_file(digest, path) is digest
    assert digest.hexdigest() == hashlib.sha256(b"firstsecond").hexdigest()
