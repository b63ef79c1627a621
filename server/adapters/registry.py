"""Tenant -> name -> versions over the store; hot swap; refcounts of in-flight use.

A request resolves "name" (latest version) or "name@N" (pinned) to an `AdapterRef` once, at
admission, and keeps it to the end: an upload that completes later becomes the latest for requests
resolved after it (hot swap), while holders of the old ref keep the old version. Deleting an
adapter hides it at once (new resolves get NotFound); requests holding a ref finish on it, and
when the last ref of a deleted version is released, `on_free(key)` is called (e.g. the cache's
`invalidate`) and the files are purged.

Thread-safe: gRPC threads resolve, upload and delete; the engine thread releases. `on_free` and
the store's purge run outside the registry lock, on whichever thread dropped the last ref.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from server.adapters.formats import AdapterKind, AdapterWeights
from server.adapters.store import AdapterInfo, AdapterStore, DeletedAdapter, Upload
from server.adapters.validate import VERSION_RE, parse_ref, validate_name
from server.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One pinned adapter version held by a request; `key` is "tenant/name@version"."""

    tenant: str
    name: str
    version: int
    kind: AdapterKind
    key: str


def parse_key(key: str) -> tuple[str, str, int]:
    """'tenant/name@N' -> (tenant, name, N); InvalidArgument otherwise."""
    tenant, _, rest = key.partition("/")
    name, _, version = rest.partition("@")
    validate_name(tenant, "tenant name")
    validate_name(name, "adapter name")
    if not VERSION_RE.fullmatch(version):
        raise InvalidArgument(f"invalid adapter key {key[:140]!r}: expected tenant/name@N")
    return tenant, name, int(version)


class RegistryUpload:
    """A store upload that, once committed, is published as the name's latest version."""

    def __init__(self, registry: "AdapterRegistry", upload: Upload) -> None:
        self._registry, self._upload = registry, upload

    def write(self, chunk: bytes) -> None:
        self._upload.write(chunk)

    def commit(self) -> AdapterInfo:
        info = self._upload.commit()
        self._registry.publish(info)
        return info

    def abort(self) -> None:
        self._upload.abort()

    def __enter__(self) -> "RegistryUpload":
        return self

    def __exit__(self, *exc: object) -> None:
        self._upload.__exit__(*exc)


class AdapterRegistry:
    def __init__(self, store: AdapterStore, infos: Iterable[AdapterInfo] | None = None,
                 on_free: Callable[[str], None] | None = None) -> None:
        """`infos`: the versions to serve, normally `store.scan().served`; default: everything stored."""
        self._store = store
        self._on_free = on_free
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, dict[int, AdapterInfo]]] = {}  # tenant -> name -> version -> info
        self._refs: dict[str, int] = {}  # key -> in-flight count
        self._deleted: dict[str, DeletedAdapter] = {}  # deleted keys still referenced
        if infos is None:
            infos = [i for t in store.tenants() for i in store.list(t)]
        for info in infos:
            self._add(info)

    # ------------------------------------------------------------ requests

    def resolve(self, tenant: str, ref: str) -> AdapterRef:
        """Pin 'name' (latest) or 'name@N' for one request. InvalidArgument, or NotFound (for any
        name this tenant cannot see: the message never tells whether another tenant has it)."""
        validate_name(tenant, "tenant name")
        name, version = parse_ref(ref)
        with self._lock:
            versions = self._index.get(tenant, {}).get(name, {})
            if version is None and versions:
                version = max(versions)
            info = versions.get(version) if version is not None else None
            if info is None:
                raise NotFound(f"adapter {ref!r} not found")
            self._refs[info.key] = self._refs.get(info.key, 0) + 1
        return AdapterRef(tenant, name, info.version, info.kind, info.key)

    def release(self, ref: AdapterRef) -> None:
        """Drop one in-flight use. ValueError if the ref is not held (a bug in the caller)."""
        with self._lock:
            count = self._refs.get(ref.key, 0)
            if count < 1:
                raise ValueError(f"release of {ref.key} which is not held")
            if count > 1:
                self._refs[ref.key] = count - 1
                return
            del self._refs[ref.key]
            deleted = self._deleted.pop(ref.key, None)
            purge = deleted is not None and not any(d is deleted for d in self._deleted.values())
        if deleted is not None:
            self._free(ref.key, deleted if purge else None)

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._refs.get(key, 0)

    def load(self, key: str) -> AdapterWeights:
        """Weights for a key, deleted-but-held versions included: the cache's `load_from_disk`."""
        tenant, name, version = parse_key(key)
        with self._lock:
            deleted = self._deleted.get(key)
        if deleted is not None:
            return self._store.load_deleted(deleted, version)
        try:
            return self._store.load(tenant, name, version)
        except NotFound:
            with self._lock:  # deleted between the check and the read
                deleted = self._deleted.get(key)
            if deleted is None:
                raise
            return self._store.load_deleted(deleted, version)

    # ------------------------------------------------------------ management

    def begin_upload(self, tenant: str, name: str, declared_size: int, sha256: str | None = None,
                     expected_kind: AdapterKind | None = None) -> RegistryUpload:
        """Streaming upload (see AdapterStore.begin_upload); commit() makes it the latest version."""
        return RegistryUpload(self, self._store.begin_upload(tenant, name, declared_size, sha256, expected_kind))

    def put(self, tenant: str, name: str, archive: bytes, sha256: str | None = None,
            expected_kind: AdapterKind | None = None) -> AdapterInfo:
        info = self._store.put(tenant, name, archive, sha256, expected_kind)
        self.publish(info)
        return info

    def publish(self, info: AdapterInfo) -> None:
        """Serve a newly stored version; new resolves of the plain name see the highest version.
        A version deleted between its commit and this call stays deleted."""
        with self._lock:
            if info.version in self._store.versions(info.tenant, info.name):
                self._add(info)

    def refresh(self) -> tuple[int, int]:
        """Follow a store shared with other replicas: serve versions they wrote, hide names they
        deleted. Returns (versions added, versions dropped). New versions are verified on their
        first load (sha256 and full validation), like every load."""
        on_disk: dict[str, AdapterInfo] = {}
        for tenant in self._store.tenants():
            try:
                on_disk.update((i.key, i) for i in self._store.list(tenant))
            except Exception as e:  # noqa: BLE001 - one unreadable tenant must not stop the rest
                log.warning("rescan: skipping tenant %s: %s", tenant, e)
        with self._lock:
            known = {i.key for names in self._index.values() for vs in names.values() for i in vs.values()}
            added = [i for k, i in on_disk.items() if k not in known and k not in self._deleted]
            for info in added:
                self._add(info)
            gone = [k for k in known if k not in on_disk]
            for key in gone:
                tenant, name, version = parse_key(key)
                versions = self._index[tenant][name]
                del versions[version]
                if not versions:
                    del self._index[tenant][name]
            free_now = [k for k in gone if not self._refs.get(k)]
        for key in free_now:
            self._free(key, None)
        return len(added), len(gone)

    def _add(self, info: AdapterInfo) -> None:
        self._index.setdefault(info.tenant, {}).setdefault(info.name, {})[info.version] = info

    def delete(self, tenant: str, name: str) -> tuple[int, ...]:
        """Hide and delete every version of a name; returns the versions. NotFound if there are none."""
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        with self._lock:
            if not self._index.get(tenant, {}).get(name):
                raise NotFound(f"adapter {name!r} not found")
            deleted = self._store.delete(tenant, name)
            del self._index[tenant][name]
            free_now = []
            for version in deleted.versions:
                key = f"{tenant}/{name}@{version}"
                if self._refs.get(key):
                    self._deleted[key] = deleted
                else:
                    free_now.append(key)
            purge = not any(d is deleted for d in self._deleted.values())
        for key in free_now:
            self._free(key, None)
        if purge:
            self._store.purge(deleted)
        return deleted.versions

    def _free(self, key: str, purge: DeletedAdapter | None) -> None:
        if self._on_free is not None:
            self._on_free(key)
        if purge is not None:
            self._store.purge(purge)

    def list(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's served versions, by name then version."""
        validate_name(tenant, "tenant name")
        with self._lock:
            names = self._index.get(tenant, {})
            return [names[n][v] for n in sorted(names) for v in sorted(names[n])]

    def latest(self, tenant: str, name: str) -> AdapterInfo:
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        with self._lock:
            versions = self._index.get(tenant, {}).get(name)
            if not versions:
                raise NotFound(f"adapter {name!r} not found")
            return versions[max(versions)]
