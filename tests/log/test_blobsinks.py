"""The verifying sinks blobs are written through: the hashing thread of large downloads."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from asman.errors import BlobCorrupt
from asman.log.blobs import FileSink


def hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "asman-sha256"]


def test_threaded_hash_verifies_and_ends(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    good = hashlib.sha256(data).hexdigest()
    sink = FileSink(tmp_path / "good", good, expected_size=len(data), hash_thread=True)
    sink.open()
    for i in range(0, len(data), 64 * 1024):
        sink.write(data[i : i + 64 * 1024])
    assert sink.commit().size == len(data)
    assert (tmp_path / "good").read_bytes() == data
    bad = FileSink(tmp_path / "bad", "0" * 64, hash_thread=True)
    bad.open()
    bad.write(data)
    with pytest.raises(BlobCorrupt):
        bad.commit()
    bad.abort()
    assert not (tmp_path / "bad").exists()
    assert hash_threads() == []


def test_a_sink_that_cannot_open_starts_no_thread(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    sink = FileSink(tmp_path / "file" / "dest", "0" * 64, hash_thread=True)
    with pytest.raises(OSError):
        sink.open()
    sink.abort()
    assert hash_threads() == []
