"""API keys -> tenants.

The keys file (`--api-keys FILE`, JSON) holds only sha256 hashes of keys:

    {"keys": [{"sha256": "<hex>", "tenant": "acme", "role": "tenant",
               "quotas": {"max_adapters": 20, "max_adapter_bytes": 1073741824,
                          "max_concurrent_requests": 16, "max_queued_requests": 64}}]}

role is "tenant" or "admin" (admins may publish shared adapters and act on any tenant's
behalf). `lorafleet keys create` adds an entry and prints the key once. The file is re-read on
SIGHUP without dropping traffic (a bad file keeps the old table and logs why). With no keys
file the server is single-tenant (tenant "default", admin) and refuses to bind beyond loopback.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from server.adapters.validate import validate_name
from server.errors import InvalidArgument, Unauthenticated

log = logging.getLogger(__name__)
SINGLE_TENANT = "default"
SHARED_TENANT = "shared"
EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
QUOTA_KEYS = ("max_adapters", "max_adapter_bytes", "max_concurrent_requests", "max_queued_requests")
MAX_KEYS_FILE_BYTES = 8 << 20


@dataclass(frozen=True)
class Quotas:
    max_adapters: int = 100
    max_adapter_bytes: int = 2 << 30
    max_concurrent_requests: int = 64
    max_queued_requests: int = 256


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    quotas: Quotas = field(default_factory=Quotas)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys_file(path: Path, defaults: Quotas) -> dict[str, Principal]:
    """sha256 -> Principal. Raises InvalidArgument naming what is wrong with the file."""
    if path.stat().st_size > MAX_KEYS_FILE_BYTES:
        raise InvalidArgument(f"{path}: larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path}: not valid JSON ({e})") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f'{path}: expected {{"keys": [...]}}')
    table = {}
    for i, e in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
            raise InvalidArgument(f"{where}: needs a 64-hex-digit sha256")
        if e.get("role", "tenant") not in ("tenant", "admin"):
            raise InvalidArgument(f"{where}: role must be 'tenant' or 'admin'")
        tenant = validate_name(e.get("tenant"), "tenant name")
        if tenant == SHARED_TENANT:
            raise InvalidArgument(f"{where}: tenant name {SHARED_TENANT!r} is reserved for shared adapters")
        q = e.get("quotas", {})
        if not isinstance(q, dict) or any(k not in QUOTA_KEYS or not isinstance(v, int) or v < 0
                                          for k, v in q.items()):
            raise InvalidArgument(f"{where}: quotas may hold non-negative integers {', '.join(QUOTA_KEYS)}")
        quotas = Quotas(**{**defaults.__dict__, **q})
        table[e["sha256"].lower()] = Principal(tenant, e.get("role") == "admin", quotas)
    return table


def create_key(path: Path, tenant: str, admin: bool) -> str:
    """Append a new key for `tenant` to the keys file (created if missing); returns the key."""
    validate_name(tenant, "tenant name")
    key = "lf_" + secrets.token_urlsafe(32)
    doc = json.loads(path.read_text()) if path.exists() else {"keys": []}
    doc["keys"].append({"sha256": hash_key(key), "tenant": tenant, "role": "admin" if admin else "tenant"})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


class Authenticator:
    """Maps a call's `authorization: Bearer <key>` metadata to a Principal."""

    def __init__(self, keys_file: Path | None, defaults: Quotas):
        self.keys_file, self.defaults = keys_file, defaults
        self._table: dict[str, Principal] = {}
        if keys_file is not None:
            self._table = parse_keys_file(keys_file, defaults)

    @property
    def single_tenant(self) -> bool:
        return self.keys_file is None

    def reload(self) -> None:
        """Re-read the keys file (SIGHUP). On error, keep serving with the old table."""
        if self.keys_file is None:
            return
        try:
            self._table = parse_keys_file(self.keys_file, self.defaults)
            log.info("reloaded %d API keys from %s", len(self._table), self.keys_file)
        except (OSError, InvalidArgument) as e:
            log.error("keeping the old API keys: %s", e)

    def principal(self, metadata) -> Principal:
        if self.single_tenant:
            return Principal(SINGLE_TENANT, True, self.defaults)
        token = ""
        for k, v in metadata or ():
            if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
                token = v[len("Bearer "):].strip()
        if not token:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        digest = hash_key(token)
        for h, p in self._table.items():   # constant-time compare against every entry
            if hmac.compare_digest(h, digest):
                return p
        raise Unauthenticated("invalid API key")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses unauthenticated calls before any handler runs (health and reflection are open)."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self.auth.single_tenant or method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        try:
            self.auth.principal(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            return _deny(str(e))
        return await continuation(handler_call_details)


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)
