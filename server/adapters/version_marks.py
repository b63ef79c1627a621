"""Per-name version high-water marks and locks, shared by every process that opens one store.

  versions/<tenant>/<name>.hwm   the highest version ever handed out for the name: raised before a
                                 version directory appears, kept across delete and quarantine
  versions/<tenant>/<name>.lock  flock(2) target serialising allocate / delete / quarantine of the name

The store allocates max(mark, versions on disk) + 1 under the lock and raises the mark before the
version appears, so a version number is never handed out twice, by any process, even one killed
half-way (that burns a number at most). Marks are replaced by rename: a crash leaves the old value
or the new one. Callers pass names that already passed validate_name.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

from server.adapters.refs import VERSION_RE

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionMarks:
    def __init__(self, root: Path, tmp: Path) -> None:
        """`root`: the versions/ directory; `tmp`: a scratch directory on the same filesystem."""
        self.root, self._tmp = root, tmp

    @contextlib.contextmanager
    def lock(self, tenant: str, name: str) -> Iterator[None]:
        """Exclusive across threads and processes (flock on a fresh open file description); the
        kernel drops it when its holder dies, kill -9 included."""
        tenant_dir = self.root / tenant
        if not tenant_dir.is_dir():
            tenant_dir.mkdir(exist_ok=True)
            fsync_dir(self.root)
        fd = os.open(tenant_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _path(self, tenant: str, name: str) -> Path:
        return self.root / tenant / f"{name}.hwm"

    def read(self, tenant: str, name: str, legacy: Path | None = None) -> int:
        """The mark (0: never used); `legacy`: an older mark file also honoured."""
        marks = [0]
        for path in (self._path(tenant, name), legacy):
            try:
                text = path.read_text()[:12].strip() if path is not None else ""
            except FileNotFoundError:
                continue
            if VERSION_RE.fullmatch(text):
                marks.append(int(text))
            elif path is not None:
                log.warning("ignoring malformed version mark %s", path)
        return max(marks)

    def raise_to(self, tenant: str, name: str, version: int, legacy: Path | None = None) -> None:
        """Make the mark at least `version` (never lowers it). Call with the name's lock held."""
        if version > self.read(tenant, name, legacy):
            self.set(tenant, name, version)

    def set(self, tenant: str, name: str, version: int) -> None:
        """Replace the mark (0 removes it). Call with the name's lock held."""
        target = self._path(tenant, name)
        if version == 0:
            target.unlink(missing_ok=True)
            return
        tmp = self._tmp / f"{uuid.uuid4().hex}.hwm"
        try:
            with open(tmp, "xb") as f:
                f.write(str(version).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
