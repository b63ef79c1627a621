"""Per-tenant upload quotas (max_adapters, max_adapter_bytes): the policy.

The count and the atomic reservation are the store's (server/adapters/reservations.py): under a
per-tenant lock shared by every replica of the store, it hands `UploadQuota` what the tenant holds
on disk plus every live upload in flight, in any process, and reserves the upload if this passes.
A new version of a name the tenant already holds (stored or in flight) is not a new adapter; its
bytes count like any other's. Shared adapters (admin keys only) have no tenant quota.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.adapters.refs import SHARED_TENANT
from server.adapters.reservations import TenantHoldings
from server.api.auth import Quotas
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
