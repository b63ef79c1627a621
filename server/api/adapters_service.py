"""The Adapters servicer: upload (client streaming), list, get, delete. The registry and store
do the work; residency comes from the engine's published snapshot."""
from __future__ import annotations

import asyncio

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import metrics
from server.adapters.refs import SHARED_TENANT, TenantRef, parse_tenant_ref
from server.adapters.registry import AdapterRegistry, RegistryUpload
from server.adapters.store import AdapterInfo, AdapterStore
from server.adapters.weights import AdapterKind, AdapterWeights
from server.api import convert, tenancy
from server.api.auth import Principal, caller
from server.api.common import status_of, unary
from server.api.generation import Draining
from server.config import ServerConfig
from server.engine.engine import Engine
from server.errors import InvalidArgument, PermissionDenied, QuotaExceeded

MAX_PAGE = 500
UPLOAD_OUTCOME = {"INVALID_ARGUMENT": "invalid", "FAILED_PRECONDITION": "invalid",
                  "RESOURCE_EXHAUSTED": "too_large", "DATA_LOSS": "checksum"}


def _count_failed_upload(err: BaseException) -> None:
    outcome = "quota" if isinstance(err, QuotaExceeded) else UPLOAD_OUTCOME.get(status_of(err).name, "error")
    metrics.UPLOADS.labels(outcome).inc()


def _namespace(principal: Principal, ref: str, write: bool) -> TenantRef:
    """'name[@N]' or 'shared/name[@N]' in the caller's view; changing shared needs an admin key."""
    target = parse_tenant_ref(principal.tenant, ref)
    if write and target.tenant == SHARED_TENANT and not principal.admin:
        raise PermissionDenied("only admin keys may change shared adapters")
    return target


def _targets(w: AdapterWeights) -> list[str]:
    return sorted({m for _, m in (*w.lora, *w.ia3, *w.bottleneck)})


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, cfg: ServerConfig, registry: AdapterRegistry, store: AdapterStore, engine: Engine,
                 draining: Draining):
        self.cfg, self.registry, self.store = cfg, registry, store
        self.engine, self.draining = engine, draining

    def _info(self, info: AdapterInfo, detail: bool = False) -> pb.AdapterInfo:
        shared = info.tenant == SHARED_TENANT
        msg = pb.AdapterInfo(
            name=(f"{SHARED_TENANT}/" if shared else "") + info.name, version=info.version,
            kind=convert.kind_to_pb(info.kind), size_bytes=info.size, sha256=info.sha256,
            created_unix=int(info.created), versions=self.store.versions(info.tenant, info.name),
            resident_tier=self.engine.residency.get(info.key, "disk"), shared=shared)
        if detail:
            w = self.registry.load(info.key)
            msg.rank = w.rank
            msg.lora_bias = w.lora_bias
            msg.targets.extend(_targets(w))
            if w.head is not None:
                msg.labels.extend(w.head.labels)
        return msg

    async def _begin_upload(self, tenant: str, name: str, size: int, sha256: str | None, kind: AdapterKind | None,
                            principal: Principal) -> RegistryUpload:
        """Reserve the upload against the tenant's quota, every replica of the store counted
        (server/api/tenancy.py), off the event loop: it may wait on another replica's hold of the
        tenant's lock. An upload begun for a call cancelled meanwhile is aborted when it is ready,
        so its reservation never outlives the call."""
        tenancy.check_upload_size(size, self.cfg.max_adapter_bytes)
        quota = tenancy.upload_quota(tenant, principal.quotas)
        task = asyncio.ensure_future(asyncio.to_thread(self.registry.begin_upload, tenant, name, size, sha256,
                                                       kind, quota))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().abort())
            raise

    @unary("UploadAdapter", on_error=_count_failed_upload)
    async def UploadAdapter(self, request_iterator, context):
        self.draining.check()
        principal = caller()
        first = None
        async for msg in request_iterator:
            first = msg
            break
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument("the first UploadAdapter message must carry metadata (name, total_bytes)")
        m = first.metadata
        if "@" in m.name:
            raise InvalidArgument("metadata.name names an adapter, not a version: drop the '@N'")
        target = _namespace(principal, (f"{SHARED_TENANT}/" if m.shared else "") + m.name, write=True)
        if m.total_bytes == 0:
            raise InvalidArgument("metadata.total_bytes must be the archive's size in bytes")
        kind = convert.adapter_kind(m.kind)
        up = await self._begin_upload(target.tenant, target.name, m.total_bytes, m.sha256 or None, kind, principal)
        try:
            async for msg in request_iterator:
                if not msg.HasField("chunk"):
                    raise InvalidArgument("after the metadata, every UploadAdapter message carries a chunk")
                up.write(msg.chunk)
            info = await asyncio.to_thread(up.commit)
        except BaseException:
            up.abort()
            raise
        metrics.UPLOADS.labels("ok").inc()
        return await asyncio.to_thread(self._info, info, True)

    @unary("ListAdapters")
    async def ListAdapters(self, request, context):
        principal = caller()
        size = request.page_size or 50
        if size > MAX_PAGE:
            raise InvalidArgument(f"page_size {size} is above the maximum of {MAX_PAGE}")
        try:
            start = int(request.page_token or "0")
        except ValueError:
            raise InvalidArgument("page_token is not one this server issued") from None
        latest: dict[tuple[str, str], AdapterInfo] = {}
        for tenant in dict.fromkeys([principal.tenant, SHARED_TENANT]):
            for info in self.registry.list(tenant):
                latest[(tenant, info.name)] = info
        infos = [latest[k] for k in sorted(latest)]
        if start < 0 or start > len(infos):
            raise InvalidArgument("page_token is not one this server issued")
        page = infos[start:start + size]
        nxt = str(start + size) if start + size < len(infos) else ""
        return pb.ListAdaptersResponse(adapters=[self._info(i) for i in page], next_page_token=nxt)

    @unary("GetAdapter")
    async def GetAdapter(self, request, context):
        principal = caller()
        target = _namespace(principal, request.name, write=False)
        info = self.registry.info(target)
        return await asyncio.to_thread(self._info, info, True)

    @unary("DeleteAdapter")
    async def DeleteAdapter(self, request, context):
        self.draining.check()
        principal = caller()
        target = _namespace(principal, request.name, write=True)
        if target.version is not None:
            raise InvalidArgument(f"DeleteAdapter removes every version of a name; "
                                  f"send {target.display.split('@')[0]!r} without '@{target.version}'")
        versions = await asyncio.to_thread(self.registry.delete, target.tenant, target.name)
        return pb.DeleteAdapterResponse(deleted_versions=list(versions))
