"""The streaming archive writer (lorafleet.archive.DirArchive): the bytes it yields are an upload
archive the one reader accepts, its size is known before a byte is read, its sha256 is the
yielded bytes', and it never holds a file whole."""
from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from lorafleet.archive import (CONFIG_FILE, WEIGHTS_FILE, ArchiveError, DirArchive, read_archive)


def adapter_dir(root: Path, weights: bytes = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
                config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps(config or {"peft_type": "LORA", "r": 4}))
    (root / WEIGHTS_FILE).write_bytes(weights)
    return root


def test_streamed_archive_is_read_back_exactly(tmp_path):
    weights = bytes(range(256)) * 5000 + b"tail"
    d = adapter_dir(tmp_path / "a", weights)
    a = DirArchive(d)
    sha = a.digest()
    data = b"".join(a.chunks(chunk=4096))
    assert len(data) == a.size and hashlib.sha256(data).hexdigest() == sha
    assert read_archive(data, 1 << 16, 1 << 22) == ((d / CONFIG_FILE).read_bytes(), weights)
    assert read_archive(io.BytesIO(data), 1 << 16, 1 << 22)[1] == weights        # from a file as well
    with zipfile.ZipFile(io.BytesIO(data)) as zf:                                   # any ZIP reader agrees
        assert zf.testzip() is None and [i.compress_type for i in zf.infolist()] == [0, 0]
    assert max(len(c) for c in a.chunks(chunk=4096)) <= 4096


def test_size_is_known_before_reading_and_bytes_are_deterministic(tmp_path):
    d = adapter_dir(tmp_path / "a", b"w" * 1000)
    a = DirArchive(d)
    assert a.crcs is None and a.size == sum(len(c) for c in DirArchive(d).chunks())
    assert DirArchive(d).digest() == DirArchive(d).digest()


def test_the_readers_guarantees_hold_for_streamed_archives(tmp_path):
    d = adapter_dir(tmp_path / "a", b"w" * 5000)
    data = b"".join(DirArchive(d).chunks())
    with pytest.raises(ArchiveError, match="more than 4000 bytes|unpacks to 5000 bytes"):
        read_archive(data, 1 << 16, 4000)
    damaged = bytearray(data)
    damaged[200] ^= 0xFF                                  # inside the weights: the CRC no longer matches
    with pytest.raises(ArchiveError, match="not a readable ZIP"):
        read_archive(bytes(damaged), 1 << 16, 1 << 20)


def test_missing_member_is_refused(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"missing {WEIGHTS_FILE}"):
        DirArchive(d)


@pytest.mark.parametrize("change", [b"", b"w" * 3000])
def test_a_file_that_changes_size_while_read_is_an_error(tmp_path, change):
    d = adapter_dir(tmp_path / "a", b"w" * 2000)
    a = DirArchive(d)
    a.digest()
    (d / WEIGHTS_FILE).write_bytes(change)
    with pytest.raises(ArchiveError, match="shrank|grew"):
        b"".join(a.chunks())


def test_memory_stays_a_few_chunks_whatever_the_file_size(tmp_path):
    """A 48 MiB weights file (sparse: zeros on disk for free) is hashed and streamed with Python
    allocations of a few MiB at most; building it in memory would peak above 48 MiB."""
    size = 48 << 20
    d = adapter_dir(tmp_path / "big", b"")
    with open(d / WEIGHTS_FILE, "wb") as f:
        f.truncate(size)
    a = DirArchive(d)
    tracemalloc.start()
    try:
        a.digest()
        h, total = hashlib.sha256(), 0
        for chunk in a.chunks():
            h.update(chunk)
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == a.size and total > size
    assert peak < 8 << 20, f"peak {peak} bytes"
