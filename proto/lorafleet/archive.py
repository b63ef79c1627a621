"""The adapter upload archive: one ZIP holding exactly `adapter_config.json` and
`adapter_model.safetensors` at top level, each stored or deflated, not encrypted.

The one reader and writer of that container, for the client (upload), the server (validation of
untrusted bytes), the trainer and the load test. Standard library only (no torch).

Two writers: `make_archive` / `archive_dir` build the bytes in memory (deflated; tests, benches);
`DirArchive` streams an adapter directory's archive from disk in chunks (both members stored, so
its size is known from the files' sizes before a byte is read; what uploads use). One reader,
`read_archive`, for bytes or a binary file.
"""
from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MEMBERS = (CONFIG_FILE, WEIGHTS_FILE)


class ArchiveError(ValueError):
    """The bytes are not a well-formed upload archive (a client mistake)."""


class ArchiveTooLarge(ArchiveError):
    """A member unpacks to more bytes than the reader's cap."""


def make_archive(config_bytes: bytes, weights: bytes) -> bytes:
    """The upload container from the two files' bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(CONFIG_FILE, config_bytes)
        zf.writestr(WEIGHTS_FILE, weights)
    return buf.getvalue()


def archive_dir(directory: Path) -> bytes:
    """Zip an adapter directory (as PEFT's save_pretrained or our writers left it) for upload."""
    directory = Path(directory)
    missing = [f for f in MEMBERS if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} (a PEFT or lorafleet adapter dir)")
    return make_archive((directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes())


# --------------------------------------------------------------------------- the streaming writer

CHUNK = 1 << 20
ZIP32_MAX = 0xFFFFFFFF                 # no ZIP64: a member or archive past 4 GiB is refused
_DOS_DATE, _DOS_TIME = (0 << 9) | (1 << 5) | 1, 0          # 1980-01-01 00:00: the same bytes every time
_UNIX_FILE = 0o100644 << 16
_LOCAL = struct.Struct("<IHHHHHIIIHH")       # local file header, without the name
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, without the name
_END = struct.Struct("<IHHHHIIH")            # end of central directory


class DirArchive:
    """The upload archive of an adapter directory, read from disk in chunks and never held whole.

    Both members are stored (safetensors weights barely deflate), so `size` comes from the files'
    sizes alone: a caller can refuse an upload that is too large before reading anything. The
    bytes are deterministic (fixed member order and timestamp): `digest()` reads the files once for
    the CRC-32s and once for the archive's sha256; `chunks()` reads them again as it yields. A file
    that changes size on the way raises ArchiveError (a changed content shows as a sha256 mismatch).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        missing = [f for f in MEMBERS if not (self.directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.directory}: missing {', '.join(missing)} (a PEFT or lorafleet adapter dir)")
        self.paths = [self.directory / f for f in MEMBERS]
        self.sizes = [p.stat().st_size for p in self.paths]
        names = sum(len(f) for f in MEMBERS)
        self.size = sum(self.sizes) + len(MEMBERS) * (_LOCAL.size + _CENTRAL.size) + 2 * names + _END.size
        if self.size > ZIP32_MAX:
            raise ArchiveTooLarge(f"{self.directory}: the archive would be {self.size} bytes; "
                                  f"uploads are at most {ZIP32_MAX} (no ZIP64)")
        self.crcs: list[int] | None = None

    def digest(self, progress: Callable[[int], None] | None = None) -> str:
        """The archive's sha256 (hex); computes the members' CRC-32s first. `progress(n)` after
        every n bytes read (twice the files' size in all)."""
        crcs = []
        for path, size in zip(self.paths, self.sizes):
            crc = 0
            for block in _read_exactly(path, size):
                crc = zlib.crc32(block, crc)
                if progress:
                    progress(len(block))
            crcs.append(crc)
        self.crcs = crcs
        h = hashlib.sha256()
        for block in self._blocks(progress):
            h.update(block)
        return h.hexdigest()

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The archive in pieces of at most `chunk` bytes (headers separately, then file blocks)."""
        if self.crcs is None:
            self.digest()
        return self._blocks(None, chunk)

    def _blocks(self, progress: Callable[[int], None] | None, chunk: int = CHUNK) -> Iterator[bytes]:
        central, offset = [], 0
        for name, path, size, crc in zip(MEMBERS, self.paths, self.sizes, self.crcs):
            raw = name.encode()
            local = _LOCAL.pack(0x04034B50, 20, 0, zipfile.ZIP_STORED, _DOS_TIME, _DOS_DATE, crc, size, size,
                                len(raw), 0) + raw
            central.append(_CENTRAL.pack(0x02014B50, (3 << 8) | 20, 20, 0, zipfile.ZIP_STORED, _DOS_TIME, _DOS_DATE,
                                         crc, size, size, len(raw), 0, 0, 0, 0, _UNIX_FILE, offset) + raw)
            yield local
            for block in _read_exactly(path, size, chunk):
                if progress:
                    progress(len(block))
                yield block
            offset += len(local) + size
        directory = b"".join(central)
        yield directory + _END.pack(0x06054B50, 0, 0, len(central), len(central), len(directory), offset, 0)


def _read_exactly(path: Path, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`size` bytes of `path` in blocks; ArchiveError if the file is not that long any more."""
    left = size
    with open(path, "rb") as f:
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise ArchiveError(f"{path} shrank while it was being read (from {size} bytes)")
            left -= len(block)
            yield block
        if f.read(1):
            raise ArchiveError(f"{path} grew while it was being read (from {size} bytes)")


# --------------------------------------------------------------------------- the reader

def read_archive(archive: bytes | BinaryIO, max_config_bytes: int,
                 max_weights_bytes: int) -> tuple[bytes, bytes]:
    """(config bytes, safetensors bytes) from an untrusted upload ZIP (bytes or a seekable binary file).

    Exactly the two members at top level (no extra, missing, duplicate, directory, '../' or absolute
    names), not encrypted, stored or deflated only; declared sizes are checked against the caps
    before reading, and reads stop at cap + 1 bytes whatever the headers claim (zip bombs).
    Raises ArchiveTooLarge past a cap, ArchiveError for anything else wrong.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, (bytes, bytearray, memoryview))
                             else archive) as zf:
            infos = zf.infolist()
            _check_members(infos)
            caps = {CONFIG_FILE: max_config_bytes, WEIGHTS_FILE: max_weights_bytes}
            out = {info.filename: _read_member(zf, info, caps[info.filename]) for info in infos}
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise ArchiveError(f"archive is not a readable ZIP file ({e})") from None
    except ArchiveError:
        raise
    except ValueError as e:
        raise ArchiveError(f"archive is not a readable ZIP file ({e})") from None
    return out[CONFIG_FILE], out[WEIGHTS_FILE]


def _check_members(infos: list[zipfile.ZipInfo]) -> None:
    names = [i.filename for i in infos]
    if sorted(names) != sorted(MEMBERS):
        shown = ", ".join(repr(n[:80]) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        raise ArchiveError(f"archive must hold exactly {CONFIG_FILE} and {WEIGHTS_FILE} at top level; "
                           f"it holds {len(names)} members: {shown}")
    for info in infos:
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {info.filename} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(f"archive member {info.filename} uses compression method "
                               f"{info.compress_type}; only stored (0) and deflated (8) are accepted")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    if info.file_size > cap:
        raise ArchiveTooLarge(f"{info.filename} unpacks to {info.file_size} bytes; the limit is {cap}")
    with zf.open(info) as f:
        data = f.read(cap + 1)  # hard cap: the declared size may lie
    if len(data) > cap:
        raise ArchiveTooLarge(f"{info.filename} unpacks to more than {cap} bytes (the limit)")
    if len(data) != info.file_size:
        raise ArchiveError(f"{info.filename} holds {len(data)} bytes but declares {info.file_size}")
    return data
