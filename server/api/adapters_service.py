"""gRPC servicer for adapter management: upload (client streaming), list, get, delete."""
from __future__ import annotations

import asyncio

import grpc

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import metrics
from server.adapters.cache import AdapterCache
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterInfo, AdapterStore
from server.adapters.validate import validate_name
from server.api.auth import SHARED_TENANT, Authenticator, Principal
from server.api.errors import status_of
from server.api.service import KIND_TO_PB, PB_TO_KIND, Draining, _abort, unary
from server.config import ServerConfig
from server.errors import InvalidArgument, PermissionDenied, ResourceExhausted

MAX_PAGE = 500
UPLOAD_OUTCOME = {"INVALID_ARGUMENT": "invalid", "FAILED_PRECONDITION": "invalid",
                  "RESOURCE_EXHAUSTED": "too_large", "DATA_LOSS": "checksum"}


def _namespace(principal: Principal, name: str, write: bool) -> tuple[str, str]:
    """(tenant, name) for 'name' or 'shared/name'; writing to shared needs an admin key."""
    if name.startswith(SHARED_TENANT + "/"):
        if write and not principal.admin:
            raise PermissionDenied("only admin keys may change shared adapters")
        return SHARED_TENANT, validate_name(name[len(SHARED_TENANT) + 1:], "adapter name")
    return principal.tenant, validate_name(name, "adapter name")


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, cfg: ServerConfig, auth: Authenticator, registry: AdapterRegistry,
                 store: AdapterStore, cache: AdapterCache, draining: Draining):
        self.cfg, self.auth, self.registry, self.store = cfg, auth, registry, store
        self.cache, self.draining = cache, draining

    def _info(self, info: AdapterInfo, detail: bool = False) -> pb.AdapterInfo:
        shared = info.tenant == SHARED_TENANT
        msg = pb.AdapterInfo(
            name=(f"{SHARED_TENANT}/" if shared else "") + info.name, version=info.version,
            kind=KIND_TO_PB[info.kind], size_bytes=info.size, sha256=info.sha256,
            created_unix=int(info.created), versions=self.store.versions(info.tenant, info.name),
            resident_tier=self.cache.tier_of(info.key), shared=shared)
        if detail:
            w = self.registry.load(info.key)
            msg.rank = w.rank
            msg.targets.extend(sorted({m for _, m in (*w.lora, *w.ia3, *w.bottleneck)}))
            if w.head is not None:
                msg.labels.extend(w.head.labels)
        return msg

    def _check_quota(self, tenant: str, name: str, size: int, principal: Principal) -> None:
        if size > self.cfg.max_adapter_bytes:
            raise ResourceExhausted(f"the upload declares {size} bytes; this server accepts at most "
                                    f"{self.cfg.max_adapter_bytes} per adapter")
        if tenant == SHARED_TENANT:
            return
        usage, q = self.store.usage(tenant), principal.quotas
        if name not in {i.name for i in self.registry.list(tenant)} and usage.adapters >= q.max_adapters:
            raise ResourceExhausted(f"tenant {tenant!r} stores {usage.adapters} adapters; "
                                    f"quota max_adapters={q.max_adapters}")
        if usage.bytes + size > q.max_adapter_bytes:
            raise ResourceExhausted(f"tenant {tenant!r} stores {usage.bytes} bytes; this upload of {size} "
                                    f"would pass quota max_adapter_bytes={q.max_adapter_bytes}")

    async def UploadAdapter(self, request_iterator, context):
        try:
            resp = await self._upload(request_iterator, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:  # noqa: BLE001 - counted by outcome, then mapped by `unary`
            outcome = "quota" if "quota" in str(err) else UPLOAD_OUTCOME.get(status_of(err).name, "error")
            metrics.UPLOADS.labels(outcome).inc()
            await _abort(context, "UploadAdapter", err)
        metrics.UPLOADS.labels("ok").inc()
        metrics.REQUESTS.labels("UploadAdapter", "OK").inc()
        return resp

    async def _upload(self, request_iterator, context) -> pb.AdapterInfo:
        self.draining.check()
        principal = self.auth.principal(context.invocation_metadata())
        first = None
        async for msg in request_iterator:
            first = msg
            break
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument("the first UploadAdapter message must carry metadata (name, total_bytes)")
        m = first.metadata
        name = (f"{SHARED_TENANT}/" if m.shared else "") + m.name
        tenant, bare = _namespace(principal, name, write=True)
        if m.total_bytes == 0:
            raise InvalidArgument("metadata.total_bytes must be the archive's size in bytes")
        self._check_quota(tenant, bare, m.total_bytes, principal)
        kind = PB_TO_KIND.get(m.kind)
        up = self.registry.begin_upload(tenant, bare, m.total_bytes, m.sha256 or None, kind)
        try:
            async for msg in request_iterator:
                if not msg.HasField("chunk"):
                    raise InvalidArgument("after the metadata, every UploadAdapter message carries a chunk")
                up.write(msg.chunk)
            info = await asyncio.to_thread(up.commit)
        except BaseException:
            up.abort()
            raise
        return self._info(info)

    @unary("ListAdapters")
    async def ListAdapters(self, request, context):
        principal = self.auth.principal(context.invocation_metadata())
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
        principal = self.auth.principal(context.invocation_metadata())
        tenant, name = _namespace(principal, request.name, write=False)
        info = self.registry.latest(tenant, name)
        return await asyncio.to_thread(self._info, info, True)

    @unary("DeleteAdapter")
    async def DeleteAdapter(self, request, context):
        self.draining.check()
        principal = self.auth.principal(context.invocation_metadata())
        tenant, name = _namespace(principal, request.name, write=True)
        versions = await asyncio.to_thread(self.registry.delete, tenant, name)
        return pb.DeleteAdapterResponse(deleted_versions=list(versions))
