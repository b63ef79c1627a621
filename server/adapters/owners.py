"""Which live process owns what in a store shared by several replicas, and the sweep of the rest.

  owners/<id>/           one empty directory per open AdapterStore, flocked (LOCK_EX) by it while it
                         is open; the kernel drops the lock when the process dies, kill -9 included
  tmp/<id>/              that store's uploads in progress (<uuid>.part), staged versions (<uuid>.d)
                         and version-mark temp files
  trash/<id>/<uuid>/     the adapters it deleted while its requests still used them
  reservations/<t>/<id>.<uuid>  its quota reservations (reservations.py)

An entry named by an id is live while owners/<id>/ is locked. Once that lock is free, any replica
may remove the entry: `sweep()` does, at every scan() and every registry rescan. Registration and
every probe of a lock run under an flock on owners/ itself, so a probe never takes a store that is
registering for a dead one, and two probes never take each other's brief hold for a live owner.
An owner's directory is created before any entry it names and removed only after they are gone.
Entries no owner names (written by older versions, or left by a sweeper killed half-way) go when
no other process has the store open, or once older than LEFTOVER_AGE_S.
Ownership is a lock, not a pid: it holds across PID namespaces (containers on one host) and
cannot be fooled by a reused pid. (A process forked without exec keeps its parent's locks.)
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
import weakref
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)
ID_RE = re.compile(r"[0-9a-f]{32}")
LEFTOVER_AGE_S = 24 * 3600.0


class Owner(enum.Enum):
    LIVE = "live"
    DEAD = "dead"        # its lock is free: the process is gone (or closed the store)
    UNKNOWN = "unknown"  # no owners/<id>/: not an id, or an owner already swept


class Owners:
    """This store's own registration (`id`, held until close()) and probes of everyone else's."""

    def __init__(self, root: Path) -> None:
        """`root`: the owners/ directory."""
        self.root = root
        self.id = uuid.uuid4().hex
        with self._registry():
            path = root / self.id
            path.mkdir()
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Give up ownership: from now on every entry of this id is a leftover."""
        self._closer()

    @contextlib.contextmanager
    def _registry(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def states(self, ids: Iterable[str]) -> dict[str, Owner]:
        """LIVE / DEAD / UNKNOWN for each id, probed under the registry lock."""
        with self._registry():
            return {i: self._probe(i) for i in set(ids)}

    def _probe(self, owner: str) -> Owner:
        if owner == self.id and self._closer.alive:
            return Owner.LIVE
        if not ID_RE.fullmatch(owner):
            return Owner.UNKNOWN
        try:
            fd = os.open(self.root / owner, os.O_RDONLY)
        except FileNotFoundError:
            return Owner.UNKNOWN
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Owner.LIVE
        finally:
            os.close(fd)  # a dead owner's lock taken for a moment, and let go
        return Owner.DEAD

    def forget(self, owner: str) -> None:
        """Remove a dead owner's directory, once nothing it named is left."""
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.root / owner)


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(owners: Owners, places: Iterable[Path], alone: bool) -> list[Path]:
    """Remove from `places` (tmp/, trash/) every entry no live owner holds; returns what went.
    An entry named by a dead owner goes at once; one no owner names goes only when `alone` (no
    other process has the store open) or when older than LEFTOVER_AGE_S. Never touches a live
    owner's entry: entries are listed before owners are probed, and an owner registers before it
    writes anything."""
    entries = [p for place in places for p in sorted(place.iterdir())]
    registered = [p.name for p in owners.root.iterdir()]
    states = owners.states([*registered, *(p.name for p in entries)])
    now, removed = time.time(), []
    for path in entries:
        state = states[path.name]
        if state is Owner.LIVE:
            continue
        if state is Owner.UNKNOWN and not alone and _age_s(path, now) < LEFTOVER_AGE_S:
            continue
        _remove(path)
        removed.append(path)
    for owner, state in states.items():
        if state is Owner.DEAD:
            owners.forget(owner)  # after its entries: a sweeper killed before this leaves only an UNKNOWN
    if removed:
        log.info("adapter store: removed %d leftovers of dead writers: %s", len(removed),
                 ", ".join(f"{p.parent.name}/{p.name}" for p in removed))
    return removed
