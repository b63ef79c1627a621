"""Per-tenant quotas, in one place: requests in flight and queued (`TenantLimiter`), and uploads
(max_adapters, max_adapter_bytes: `UploadQuota`, the policy).

Requests in flight are counted here, on the event loop; requests queued are the engine's own count,
read under its lock (the engine also keeps a share of its queue for other tenants, whatever a
tenant's quota). Uploads:

The count and the atomic reservation are the store's (server/adapters/reservations.py): under a
per-tenant lock shared by every replica of the store, it hands `UploadQuota` what the tenant holds
on disk plus every live upload in flight, in any process, and reserves the upload if this passes.
A new version of a name the tenant already holds (stored or in flight) is not a new adapter; its
bytes count like any other's. Shared adapters (admin keys only) have no tenant quota.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from server.adapters.refs import SHARED_TENANT
from server.adapters.reservations import TenantHoldings
from server.api.auth import Principal, Quotas
from server.errors import QuotaExceeded, ResourceExhausted


def check_upload_size(size: int, max_adapter_bytes: int) -> None:
    """The server-wide cap on one adapter (--max-adapter-bytes), checked before any quota."""
    if size > max_adapter_bytes:
        raise ResourceExhausted(f"the upload declares {size} bytes; this server accepts at most "
                                f"{max_adapter_bytes} per adapter")


@dataclass(frozen=True)
class UploadQuota:
    """The store's QuotaCheck for one tenant's upload."""
    tenant: str
    quotas: Quotas

    def __call__(self, name: str, size: int, held: TenantHoldings) -> None:
        subject, q = f"tenant:{self.tenant}", self.quotas
        adapters = len(held.names)
        if name not in held.names and adapters >= q.max_adapters:
            raise QuotaExceeded(f"tenant {self.tenant!r} stores {adapters} adapters (uploads in progress on every "
                                f"replica included); quota max_adapters={q.max_adapters}", subject, "max_adapters")
        if held.bytes + size > q.max_adapter_bytes:
            raise QuotaExceeded(f"tenant {self.tenant!r} stores {held.bytes} bytes (uploads in progress on every "
                                f"replica included); this upload of {size} would pass quota "
                                f"max_adapter_bytes={q.max_adapter_bytes}", subject, "max_adapter_bytes")


def upload_quota(tenant: str, quotas: Quotas) -> UploadQuota | None:
    """The check for an upload into `tenant`'s namespace (None: shared adapters are not metered)."""
    return None if tenant == SHARED_TENANT else UploadQuota(tenant, quotas)


class TenantLimiter:
    """max_concurrent_requests (sequences in flight, counted here) and max_queued_requests (the
    engine's count of the tenant's sequences not yet admitted: `queued(tenant)`)."""

    def __init__(self, queued: Callable[[str], int]) -> None:
        self.queued = queued
        self.live: dict[str, set] = defaultdict(set)      # tenant -> its Sequences in flight

    def check(self, p: Principal, n: int = 1) -> None:
        live, q = len(self.live[p.tenant]), p.quotas
        if live + n > q.max_concurrent_requests:
            raise QuotaExceeded(f"tenant {p.tenant!r} has {live} requests in flight; "
                                f"quota max_concurrent_requests={q.max_concurrent_requests}",
                                f"tenant:{p.tenant}", "max_concurrent_requests")
        queued = self.queued(p.tenant)
        if queued + n > q.max_queued_requests:
            raise QuotaExceeded(f"tenant {p.tenant!r} has {queued} requests queued; "
                                f"quota max_queued_requests={q.max_queued_requests}",
                                f"tenant:{p.tenant}", "max_queued_requests")

    def add(self, seq) -> None:
        self.live[seq.tenant].add(seq)

    def done(self, seq) -> None:
        """Idempotent: a Classify batch calls it for every text, iterated or not."""
        live = self.live.get(seq.tenant)
        if live is not None:
            live.discard(seq)
            if not live:
                del self.live[seq.tenant]
