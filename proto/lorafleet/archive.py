"""The adapter upload archive: one ZIP holding exactly `adapter_config.json` and
`adapter_model.safetensors` at top level, each stored or deflated, not encrypted.

The one reader and writer of that container, for the client (upload), the server (validation of
untrusted bytes), the trainer and the load test. Standard library only (no torch).
"""
from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

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


def read_archive(archive: bytes, max_config_bytes: int, max_weights_bytes: int) -> tuple[bytes, bytes]:
    """(config bytes, safetensors bytes) from an untrusted upload ZIP.

    Exactly the two members at top level (no extra, missing, duplicate, directory, '../' or absolute
    names), not encrypted, stored or deflated only; declared sizes are checked against the caps
    before reading, and reads stop at cap + 1 bytes whatever the headers claim (zip bombs).
    Raises ArchiveTooLarge past a cap, ArchiveError for anything else wrong.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
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
