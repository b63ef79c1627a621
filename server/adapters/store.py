"""Durable on-disk adapter store: immutable versions, atomic writes, sha256, quarantine.

Layout under `root` (every path component from user text has passed validate_name first):
  adapters/<tenant>/<name>/v<N>/adapter.zip   the upload archive, byte for byte
  adapters/<tenant>/<name>/v<N>/meta.json     {"kind", "sha256", "size", "created", "version"}
  versions/<tenant>/<name>.hwm|.lock  version high-water mark and lock (see version_marks.py)
  owners/<id>/     one per open store, locked by it while it lives (owners.py)
  tmp/<id>/        its uploads in progress and staged versions (same filesystem)
  trash/<id>/      adapters it deleted that its in-flight requests still hold
  reservations/    per-tenant quota reservations of uploads in flight (reservations.py)
  quarantine/      versions that failed verification at scan(), moved aside with a WARNING log line

Whatever a dead store left in tmp/ and trash/ is swept by any replica: `sweep()`, at every scan()
and every registry rescan (owners.py says what counts as dead). Tenant quotas passed to
begin_upload hold across every replica sharing the store (reservations.py).

A version appears only by one rename of a fully written, fsynced, validated directory, so a failed
or interrupted upload leaves nothing in adapters/. Versions are never reused for a name, even after
delete or quarantine, and even when several replicas share the store (version_marks.py). (Stores
written before the marks existed kept `adapters/<t>/<n>/.hwm`, only on delete; it is still read.)
"tenant/name@N" therefore always names the same bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.adapters import owners as owners_mod
from server.adapters.weights import AdapterKind, AdapterWeights
from server.model.shape import BaseModelShape
from server.adapters.reservations import QuotaCheck, Reservation, Reservations, TenantHoldings
from server.adapters.safe_io import load_json_object
from server.adapters.refs import NAME_RE, VERSION_RE, AdapterKey, validate_name
from server.adapters.validate import AdapterLimits, check_sha256, parse_upload, validate_sha256
from server.adapters.version_marks import VersionMarks, fsync_dir
from server.errors import DataLoss, FailedPrecondition, InvalidArgument, LoraFleetError, NotFound, ResourceExhausted

log = logging.getLogger(__name__)
ARCHIVE, META, HWM = "adapter.zip", "meta.json", ".hwm"  # HWM: the legacy mark inside a name directory


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    version: int
    kind: AdapterKind
    sha256: str
    size: int  # bytes of the archive
    created: float  # unix time

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.tenant, self.name, self.version)


@dataclass(frozen=True)
class TenantUsage:
    adapters: int  # names with at least one version
    versions: int
    bytes: int


@dataclass(frozen=True)
class ScanReport:
    served: tuple[AdapterInfo, ...]
    quarantined: tuple[tuple[str, str], ...]  # (path relative to root, reason)
    unfit: tuple[tuple[str, str], ...]  # intact but not for this base model: left in place, not served


@dataclass(frozen=True)
class DeletedAdapter:
    tenant: str
    name: str
    versions: tuple[int, ...]
    trash: Path  # holds v<N>/ directories until purge()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _is_store_dir(path: Path) -> bool:
    """A tenant or name directory: a real directory (no symlink) whose name passes validate_name."""
    return _is_real_dir(path) and NAME_RE.fullmatch(path.name) is not None


class Upload:
    """Streaming writer for one upload: write(chunk)..., then commit(); any other exit leaves nothing.

    Use as a context manager: leaving the block without commit() (an exception, a cancelled RPC)
    aborts and removes the temp file. Once commit() has begun, it alone cleans up: abort() from
    another thread meanwhile is a no-op (it would drop the quota reservation of a version about
    to appear).
    """

    def __init__(self, store: "AdapterStore", tenant: str, name: str, declared_size: int,
                 sha256: str | None, expected_kind: AdapterKind | None,
                 reservation: Reservation | None = None) -> None:
        self._store, self.tenant, self.name = store, tenant, name
        self.declared_size, self._sha256, self._kind = declared_size, sha256, expected_kind
        self._reservation = reservation  # released by abort(), or as the version appears
        self._path = store.tmp / f"{uuid.uuid4().hex}.part"
        try:
            self._file: BinaryIO | None = open(self._path, "xb")
        except BaseException:
            Reservations.release(reservation)
            raise
        self._hash = hashlib.sha256()
        self._written = 0
        self._done = self._committing = False

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise FailedPrecondition("upload is already committed or aborted")
        if self._written + len(chunk) > self.declared_size:
            self.abort()
            raise ResourceExhausted(f"upload sent more than its declared size of {self.declared_size} bytes")
        self._file.write(chunk)
        self._hash.update(chunk)
        self._written += len(chunk)

    def commit(self) -> AdapterInfo:
        """Verify size and sha256, validate fully, then publish as the next version."""
        if self._file is None:
            raise FailedPrecondition("upload is already committed or aborted")
        self._committing = True
        try:
            if self._written != self.declared_size:
                raise InvalidArgument(f"upload ended after {self._written} of {self.declared_size} declared bytes")
            digest = self._hash.hexdigest()
            if self._sha256 is not None and digest != self._sha256:
                raise DataLoss(f"sha256 mismatch: declared {self._sha256}, received bytes hash to {digest}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            data = self._path.read_bytes()
            weights = parse_upload(data, self._store.base, self._store.limits, self._kind)
            info = self._store._publish(self._path, self.tenant, self.name, weights.kind, digest, len(data),
                                        self._reservation)
        except BaseException:
            self._discard()
            raise
        self._done = True
        return info

    def abort(self) -> None:
        if not self._committing:
            self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)
        Reservations.release(self._reservation)

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


class AdapterStore:
    """Thread- and process-safe: uploads stream in parallel; publishing and deleting take the name's
    lock (an flock, so replicas sharing one directory exclude each other too)."""

    def __init__(self, root: Path, base: BaseModelShape, limits: AdapterLimits) -> None:
        self.root, self.base, self.limits = Path(root), base, limits
        for sub in ("adapters", "versions", "owners", "tmp", "trash", "reservations", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # presence: a shared flock on the root directory while this store is open (every replica of
        # a shared store holds one); scan() sweeps entries no owner names only when it can take it
        # exclusively. Taken before registering, so a store sweeping alone sees no newcomer's files.
        self._presence = os.open(self.root, os.O_RDONLY)
        fcntl.flock(self._presence, fcntl.LOCK_SH)
        self._closer = weakref.finalize(self, os.close, self._presence)
        self._owners = owners_mod.Owners(self.root / "owners")
        self.tmp, self._trash = self.root / "tmp" / self._owners.id, self.root / "trash" / self._owners.id
        self.tmp.mkdir()
        self._trash.mkdir()
        self._marks = VersionMarks(self.root / "versions", self.tmp)
        self._reservations = Reservations(self.root / "reservations", self._owners, self._stored)

    def close(self) -> None:
        """Drop this store's presence and ownership (what the kernel does when the process dies):
        its uploads in progress, reservations and trash become leftovers for any replica to sweep."""
        self._owners.close()
        self._closer()

    # ------------------------------------------------------------ writes

    def begin_upload(self, tenant: str, name: str, declared_size: int, sha256: str | None = None,
                     expected_kind: AdapterKind | None = None, quota: QuotaCheck | None = None) -> Upload:
        """Start a streaming upload. InvalidArgument for bad names/size/sha256; ResourceExhausted over the limit.
        `quota`: asked under the tenant's store-wide lock with what the tenant holds on disk and in
        flight in every live process; if it passes, the upload is reserved until commit or abort."""
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        if sha256 is not None:
            sha256 = validate_sha256(sha256)          # hex digits in either case; kept lowercase
        if not isinstance(declared_size, int) or isinstance(declared_size, bool) or declared_size < 1:
            raise InvalidArgument(f"declared upload size must be a positive integer, got {declared_size!r}")
        if declared_size > self.limits.max_archive_bytes:
            raise ResourceExhausted(f"upload is {declared_size} bytes; the limit is {self.limits.max_archive_bytes}")
        reservation = None if quota is None else self._reservations.reserve(tenant, name, declared_size, quota)
        return Upload(self, tenant, name, declared_size, sha256, expected_kind, reservation)

    def put(self, tenant: str, name: str, archive: bytes, sha256: str | None = None,
            expected_kind: AdapterKind | None = None, quota: QuotaCheck | None = None) -> AdapterInfo:
        """The whole archive at once; same checks as begin_upload + commit."""
        with self.begin_upload(tenant, name, len(archive), sha256, expected_kind, quota) as up:
            up.write(archive)
            return up.commit()

    def _publish(self, part: Path, tenant: str, name: str, kind: AdapterKind, sha256: str,
                 size: int, reservation: Reservation | None = None) -> AdapterInfo:
        stage = self.tmp / f"{uuid.uuid4().hex}.d"
        stage.mkdir()
        try:
            os.rename(part, stage / ARCHIVE)
            name_dir = self._name_dir(tenant, name)
            with self._marks.lock(tenant, name):
                self._make_dirs(name_dir)
                before = self._marks.read(tenant, name, name_dir / HWM)
                version = max([*self._dir_versions(name_dir), before]) + 1
                self._marks.set(tenant, name, version)  # durable before v<N> exists: N is never handed out again
                info = AdapterInfo(tenant, name, version, kind, sha256, size, time.time())
                try:
                    with self._reservations.settling(reservation):  # v<N> counts from the moment it exists
                        self._place(stage, name_dir, info)
                except BaseException:
                    if not (name_dir / f"v{version}").exists():  # nobody saw N: give it back (a kill -9 burns it)
                        self._marks.set(tenant, name, before)
                    raise
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return info

    @staticmethod
    def _place(stage: Path, name_dir: Path, info: AdapterInfo) -> None:
        """Write meta.json into the staged directory and publish it as v<N> by one rename."""
        meta = {"kind": info.kind.value, "sha256": info.sha256, "size": info.size, "created": info.created,
                "version": info.version}
        _write_synced(stage / META, json.dumps(meta).encode())
        fsync_dir(stage)
        os.rename(stage, name_dir / f"v{info.version}")
        fsync_dir(name_dir)

    def _make_dirs(self, path: Path) -> None:
        missing = [p for p in (path.parent, path) if not p.exists()]
        for p in missing:
            p.mkdir(exist_ok=True)
            fsync_dir(p.parent)

    def delete(self, tenant: str, name: str) -> DeletedAdapter:
        """Remove every version of a name from the store (moved to trash/ until purge()). NotFound if none."""
        name_dir = self._name_dir(tenant, name)
        with self._marks.lock(tenant, name):
            versions = tuple(self._dir_versions(name_dir))
            if not versions:
                raise NotFound(f"adapter {name!r} not found")
            self._marks.raise_to(tenant, name, versions[-1], name_dir / HWM)  # a no-op unless the store predates the mark
            trash = self._trash / uuid.uuid4().hex
            os.rename(name_dir, trash)
            fsync_dir(name_dir.parent)
        return DeletedAdapter(tenant, name, versions, trash)

    def purge(self, deleted: DeletedAdapter) -> None:
        """Free the disk space of a deleted adapter once nothing uses it any more."""
        shutil.rmtree(deleted.trash, ignore_errors=True)

    # ------------------------------------------------------------ reads

    def _name_dir(self, tenant: str, name: str) -> Path:
        return self.root / "adapters" / validate_name(tenant, "tenant name") / validate_name(name, "adapter name")

    @staticmethod
    def _dir_versions(name_dir: Path) -> list[int]:
        if not _is_real_dir(name_dir):
            return []
        return sorted(int(p.name[1:]) for p in name_dir.iterdir()
                      if p.name.startswith("v") and VERSION_RE.fullmatch(p.name[1:]) and _is_real_dir(p))

    def versions(self, tenant: str, name: str) -> list[int]:
        return self._dir_versions(self._name_dir(tenant, name))

    def tenants(self) -> list[str]:
        return sorted(p.name for p in (self.root / "adapters").iterdir() if _is_store_dir(p))

    def info(self, tenant: str, name: str, version: int) -> AdapterInfo:
        """Metadata of one stored version (not re-verified). NotFound if absent."""
        path = self._name_dir(tenant, name) / f"v{version}"
        if not (path / META).is_file():
            raise NotFound(f"adapter {name}@{version} not found")
        return self._read_meta(path, tenant, name)

    def _read_meta(self, vdir: Path, tenant: str, name: str) -> AdapterInfo:
        version = int(vdir.name[1:])
        try:
            with open(vdir / META, "rb") as f:
                meta = load_json_object(f.read(4096), f"{vdir.name}/{META}")
        except FileNotFoundError:  # deleted or purged meanwhile
            raise NotFound(f"adapter {name}@{version} not found") from None
        if meta.get("version") != version:
            raise DataLoss(f"{META} of {name}@{version} names version {meta.get('version')!r}")
        try:
            return AdapterInfo(tenant, name, version, AdapterKind(meta["kind"]), str(meta["sha256"]),
                               int(meta["size"]), float(meta["created"]))
        except (KeyError, ValueError, TypeError) as e:
            raise DataLoss(f"{META} of {name}@{version} is malformed ({e})") from None

    def list(self, tenant: str) -> list[AdapterInfo]:
        """Every stored version of the tenant's adapters, by name then version."""
        tenant_dir = self.root / "adapters" / validate_name(tenant, "tenant name")
        if not _is_real_dir(tenant_dir):
            return []
        return [self.info(tenant, p.name, v) for p in sorted(tenant_dir.iterdir()) if _is_store_dir(p)
                for v in self._dir_versions(p)]

    def usage(self, tenant: str) -> TenantUsage:
        infos = self.list(tenant)
        return TenantUsage(len({i.name for i in infos}), len(infos), sum(i.size for i in infos))

    def holdings(self, tenant: str) -> TenantHoldings:
        """What a quota check sees: stored on disk plus live uploads in flight, every replica together."""
        return self._reservations.holdings(validate_name(tenant, "tenant name"))

    def _stored(self, tenant: str) -> tuple[frozenset[str], int]:
        """Names with a version on disk and the bytes of their archives (read from the directory
        tree, not metadata, so a version deleted or quarantined meanwhile is simply not there)."""
        names, size = set(), 0
        tenant_dir = self.root / "adapters" / tenant
        for name_dir in tenant_dir.iterdir() if _is_real_dir(tenant_dir) else ():
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                for v in self._dir_versions(name_dir) if _is_store_dir(name_dir) else ():
                    size += (name_dir / f"v{v}" / ARCHIVE).stat().st_size
                    names.add(name_dir.name)
        return frozenset(names), size

    def load(self, tenant: str, name: str, version: int) -> AdapterWeights:
        """Read, verify (sha256 vs meta -> DataLoss) and parse one version. NotFound if absent."""
        info = self.info(tenant, name, version)
        return self._load_dir(self._name_dir(tenant, name) / f"v{version}", info)

    def load_deleted(self, deleted: DeletedAdapter, version: int) -> AdapterWeights:
        """A version of a deleted adapter, for requests that resolved it before the delete."""
        if version not in deleted.versions:
            raise NotFound(f"adapter {deleted.name}@{version} not found")
        vdir = deleted.trash / f"v{version}"
        return self._load_dir(vdir, self._read_meta(vdir, deleted.tenant, deleted.name))

    def _load_dir(self, vdir: Path, info: AdapterInfo) -> AdapterWeights:
        try:
            with open(vdir / ARCHIVE, "rb") as f:
                data = f.read(self.limits.max_archive_bytes + 1)
        except FileNotFoundError:  # deleted or purged meanwhile
            raise NotFound(f"adapter {info.name}@{info.version} not found") from None
        if len(data) != info.size:
            raise DataLoss(f"stored adapter {info.key} is {len(data)} bytes; its metadata says {info.size}")
        check_sha256(data, info.sha256)
        return parse_upload(data, self.base, self.limits, info.kind)

    # ------------------------------------------------------------ start-up

    def sweep(self, alone: bool = False) -> list[Path]:
        """Remove what dead stores left in tmp/ and trash/ (uploads in progress, staged versions,
        deleted versions), never a live one's; returns what went. Any replica, at any time.
        `alone`: no other process has the store open (held exclusively), so entries no owner names
        (left by versions before owners/ existed) go too."""
        return owners_mod.sweep(self._owners, (self.root / "tmp", self.root / "trash"), alone)

    def _sweep_at_start(self) -> None:
        """sweep(), alone if no other process has this store open. The presence lock is re-taken,
        not converted atomically."""
        try:
            fcntl.flock(self._presence, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # others are live (or the filesystem cannot tell)
            fcntl.flock(self._presence, fcntl.LOCK_SH)
            self.sweep()
            return
        try:
            self.sweep(alone=True)
        finally:
            fcntl.flock(self._presence, fcntl.LOCK_SH)

    def scan(self) -> ScanReport:
        """Sweep leftovers of dead stores, re-verify every version; quarantine the corrupt, serve the rest."""
        self._sweep_at_start()
        served: list[AdapterInfo] = []
        quarantined: list[tuple[str, str]] = []
        unfit: list[tuple[str, str]] = []
        for path, reason, info in self._walk():
            rel = str(path.relative_to(self.root))
            if info is not None:
                served.append(info)
            elif isinstance(reason, FailedPrecondition):
                log.warning("adapter %s does not fit this base model, not served: %s", rel, reason)
                unfit.append((rel, str(reason)))
            else:
                self._quarantine(path, str(reason))
                quarantined.append((rel, str(reason)))
        return ScanReport(tuple(served), tuple(quarantined), tuple(unfit))

    def _walk(self):
        """Yield (path, error | None, AdapterInfo | None) for every entry under adapters/."""
        for tenant_dir in sorted((self.root / "adapters").iterdir()):
            if not _is_store_dir(tenant_dir):
                yield tenant_dir, InvalidArgument("unexpected entry in the store"), None
                continue
            for name_dir in sorted(tenant_dir.iterdir()):
                yield from self._walk_name(tenant_dir.name, name_dir)

    def _walk_name(self, tenant: str, name_dir: Path):
        if not _is_store_dir(name_dir):
            yield name_dir, InvalidArgument("unexpected entry in the store"), None
            return
        self._cover_versions(tenant, name_dir.name)
        for vdir in sorted(name_dir.iterdir()):
            if vdir.name == HWM:
                continue
            if not (vdir.name.startswith("v") and VERSION_RE.fullmatch(vdir.name[1:]) and _is_real_dir(vdir)):
                yield vdir, InvalidArgument("unexpected entry in the store"), None
                continue
            try:
                info = self._read_meta(vdir, tenant, name_dir.name)
                self._load_dir(vdir, info)
            except (LoraFleetError, OSError) as e:
                yield vdir, e, None
                continue
            yield vdir, None, info

    def _cover_versions(self, tenant: str, name: str) -> None:
        """Raise the mark over every version on disk before any may be quarantined: a store written
        before the mark existed then never hands out a quarantined number again."""
        name_dir = self._name_dir(tenant, name)
        versions = self._dir_versions(name_dir)
        if versions and versions[-1] > self._marks.read(tenant, name, name_dir / HWM):
            with self._marks.lock(tenant, name):
                self._marks.raise_to(tenant, name, versions[-1], name_dir / HWM)

    def quarantine_version(self, key: AdapterKey, reason: str) -> None:
        """Move one stored version to quarantine/ (an unsafe adapter found after its upload); a
        version already gone (another replica quarantined or deleted it) is left as it is."""
        name_dir = self._name_dir(key.tenant, key.name)
        with self._marks.lock(key.tenant, key.name):
            vdir = name_dir / f"v{key.version}"
            if _is_real_dir(vdir):
                self._quarantine(vdir, reason)
                fsync_dir(name_dir)

    def _quarantine(self, path: Path, reason: str) -> None:
        rel = path.relative_to(self.root / "adapters")
        target = self.root / "quarantine" / f"{str(rel).replace(os.sep, '__')}.{time.time_ns()}"
        os.rename(path, target)
        log.warning("quarantined adapter %s -> %s: %s", rel, target.relative_to(self.root), reason)
