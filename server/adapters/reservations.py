"""Per-tenant reservations for uploads in flight, shared by every process that opens one store.

  reservations/<tenant>/                flock(2) target: one check-and-reserve at a time per tenant
  reservations/<tenant>/<owner>.<uuid>  one upload in flight: {"name": ..., "bytes": declared size}

A quota check runs under the tenant's lock and sees what the tenant holds: the names and bytes
stored on disk (not any process's registry view) plus the reservations of every live owner
(owners.py), in any process. A reservation whose owner is not live (the process died, or closed its
store) does not count, and the check removes it. A version appears on disk and its reservation goes
in one step under the same lock (`settling`), so no check counts an upload twice or not at all.
What is allowed is the caller's policy (`QuotaCheck`, server/api/tenancy.py); this module only
makes the count true and the reservation atomic. Callers pass names that passed validate_name.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.adapters.owners import Owner, Owners

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantHoldings:
    """What one tenant holds, every replica together, at the moment of a quota check."""
    stored_names: frozenset[str]    # names with at least one version on disk
    stored_bytes: int               # bytes of every version on disk
    pending_names: frozenset[str]   # names of uploads in flight in live processes
    pending_bytes: int              # their declared sizes

    @property
    def names(self) -> frozenset[str]:
        return self.stored_names | self.pending_names

    @property
    def bytes(self) -> int:
        return self.stored_bytes + self.pending_bytes


# (name, declared bytes, holdings) -> None to allow; raises (a LoraFleetError) to refuse
QuotaCheck = Callable[[str, int, TenantHoldings], None]
# tenant -> (names stored on disk, bytes stored on disk)
StoredCounter = Callable[[str], tuple[frozenset[str], int]]


@dataclass(frozen=True)
class Reservation:
    tenant: str
    path: Path


class Reservations:
    def __init__(self, root: Path, owners: Owners, stored: StoredCounter) -> None:
        """`root`: the reservations/ directory; `stored`: counts a tenant's adapters on disk."""
        self.root, self._owners, self._stored = root, owners, stored

    @contextlib.contextmanager
    def locked(self, tenant: str) -> Iterator[None]:
        """The tenant's lock: exclusive across threads and processes, dropped when its holder dies."""
        tenant_dir = self.root / tenant
        tenant_dir.mkdir(exist_ok=True)  # never removed: a waiter's lock target stays the same
        fd = os.open(tenant_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def reserve(self, tenant: str, name: str, size: int, check: QuotaCheck) -> Reservation:
        """Run `check` on the tenant's holdings and, if it passes, reserve `size` bytes for `name`."""
        with self.locked(tenant):
            check(name, size, self.holdings(tenant, locked=True))
            path = self.root / tenant / f"{self._owners.id}.{uuid.uuid4().hex}"
            with open(path, "x") as f:  # no fsync: after a crash every owner is dead anyway
                json.dump({"name": name, "bytes": size}, f)
        return Reservation(tenant, path)

    @staticmethod
    def release(reservation: Reservation | None) -> None:
        """Drop a reservation (no lock needed: a count can only fall)."""
        if reservation is not None:
            reservation.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def settling(self, reservation: Reservation | None) -> Iterator[None]:
        """Hold the tenant's lock while the reserved upload appears on disk, then drop the
        reservation; on an exception it is kept for the caller to release."""
        if reservation is None:
            yield
            return
        with self.locked(reservation.tenant):
            yield
            self.release(reservation)

    def holdings(self, tenant: str, locked: bool = False) -> TenantHoldings:
        """Stored plus live reservations; removes reservations of owners that are gone.
        `locked`: the caller holds the tenant's lock (otherwise the answer may be stale at once)."""
        with contextlib.nullcontext() if locked else self.locked(tenant):
            names, stored = self._stored(tenant)
            files = list((self.root / tenant).iterdir())
            states = self._owners.states(f.name.partition(".")[0] for f in files)
            pending: list[tuple[str, int]] = []
            for f in files:
                if states[f.name.partition(".")[0]] is not Owner.LIVE:
                    f.unlink(missing_ok=True)  # its writer died: it never counts again
                    continue
                try:
                    doc = json.loads(f.read_text())
                    pending.append((str(doc["name"]), int(doc["bytes"])))
                except FileNotFoundError:
                    continue  # released meanwhile
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("ignoring malformed reservation %s: %s", f, e)
        return TenantHoldings(names, stored, frozenset(n for n, _ in pending), sum(b for _, b in pending))
