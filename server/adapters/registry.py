"""Tenant -> name -> versions over the store; hot swap; refcounts of in-flight use.

A request resolves "name" (latest version) or "name@N" (pinned) to an `AdapterRef` once, at
admission, and keeps it to the end: an upload that completes later becomes the latest for requests
resolved after it (hot swap), while holders of the old ref keep the old version. Deleting an
adapter hides it at once (new resolves get NotFound); requests holding a ref finish on it, and
when the last ref of a deleted version is released, its key is put on `freed` (a queue the engine
drains to drop the version from its adapter cache) and the files are purged.

Thread-safe: gRPC threads resolve, upload and delete; the engine thread releases. The store's
purge runs outside the registry lock, on whichever thread dropped the last ref. Every rescan of a
shared store (`refresh`) also sweeps what dead replicas left in it (AdapterStore.sweep).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterable

from server.adapters.weights import AdapterKind, AdapterWeights
from server.adapters.reservations import QuotaCheck
from server.adapters.store import AdapterInfo, AdapterStore, DeletedAdapter, Upload
from server.adapters.refs import AdapterKey, TenantRef, validate_name
from server.errors import NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One pinned adapter version held by a request (released exactly once, by the engine)."""

    key: AdapterKey
    kind: AdapterKind
    display: str                   # how the caller named it, for messages ('shared/x', 'x@2')

    @property
    def version(self) -> int:
        return self.key.version


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
    def __init__(self, store: AdapterStore, infos: Iterable[AdapterInfo] | None = None) -> None:
        """`infos`: the versions to serve, normally `store.scan().served`; default: everything stored."""
        self._store = store
        self.freed: queue.SimpleQueue[AdapterKey] = queue.SimpleQueue()  # drained by the engine thread
        self._lock = threading.RLock()
        self._index: dict[str, dict[str, dict[int, AdapterInfo]]] = {}  # tenant -> name -> version -> info
        self._refs: dict[AdapterKey, int] = {}  # key -> in-flight count
        self._deleted: dict[AdapterKey, DeletedAdapter] = {}  # deleted keys still referenced
        if infos is None:
            infos = [i for t in store.tenants() for i in store.list(t)]
        for info in infos:
            self._add(info)

    # ------------------------------------------------------------ requests

    def resolve(self, ref: TenantRef) -> AdapterRef:
        """Pin 'name' (latest) or 'name@N' in a namespace for one request. NotFound for any name
        the caller cannot see (the message never tells whether another tenant has it)."""
        with self._lock:
            info = self.info(ref)
            self._refs[info.key] = self._refs.get(info.key, 0) + 1
        return AdapterRef(info.key, info.kind, ref.display)

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

    def in_flight(self, key: AdapterKey) -> int:
        with self._lock:
            return self._refs.get(key, 0)

    def load(self, key: AdapterKey) -> AdapterWeights:
        """Weights for a key, deleted-but-held versions included: the cache's `load_from_disk`."""
        tenant, name, version = key.tenant, key.name, key.version
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
                     expected_kind: AdapterKind | None = None, quota: QuotaCheck | None = None) -> RegistryUpload:
        """Streaming upload (see AdapterStore.begin_upload, quota included); commit() makes it the
        latest version. May wait on another replica's hold of the tenant's quota lock."""
        return RegistryUpload(self, self._store.begin_upload(tenant, name, declared_size, sha256, expected_kind,
                                                             quota))

    def put(self, tenant: str, name: str, archive: bytes, sha256: str | None = None,
            expected_kind: AdapterKind | None = None, quota: QuotaCheck | None = None) -> AdapterInfo:
        info = self._store.put(tenant, name, archive, sha256, expected_kind, quota)
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
        deleted; sweep what dead replicas left. Returns (versions added, versions dropped). New
        versions are verified on their first load (sha256 and full validation), like every load."""
        try:
            self._store.sweep()
        except OSError as e:  # leftovers wait for the next rescan; following the store matters more
            log.warning("rescan: sweeping leftovers of dead writers failed: %s", e)
        on_disk: dict[AdapterKey, AdapterInfo] = {}
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
                versions = self._index[key.tenant][key.name]
                del versions[key.version]
                if not versions:
                    del self._index[key.tenant][key.name]
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
                key = AdapterKey(tenant, name, version)
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

    def quarantine(self, key: AdapterKey, reason: str) -> None:
        """Stop serving one version that proved unsafe (the engine's first-load probe): new resolves
        get NotFound, requests holding it keep their pin, the store moves it to quarantine/."""
        with self._lock:
            versions = self._index.get(key.tenant, {}).get(key.name, {})
            if versions.pop(key.version, None) is None:
                return
            if not versions:
                del self._index[key.tenant][key.name]
        self._store.quarantine_version(key, reason)

    def _free(self, key: AdapterKey, purge: DeletedAdapter | None) -> None:
        self.freed.put(key)
        if purge is not None:
            self._store.purge(purge)

    def list(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's served versions, by name then version."""
        validate_name(tenant, "tenant name")
        with self._lock:
            names = self._index.get(tenant, {})
            return [names[n][v] for n in sorted(names) for v in sorted(names[n])]

    def info(self, ref: TenantRef) -> AdapterInfo:
        """The served version `ref` names (latest when unpinned), without pinning it."""
        with self._lock:
            versions = self._index.get(ref.tenant, {}).get(ref.name, {})
            version = max(versions) if ref.version is None and versions else ref.version
            info = versions.get(version) if version is not None else None
            if info is None:
                raise NotFound(f"adapter {ref.display!r} not found")
            return info
