"""API keys -> tenants.

The keys file (`--api-keys FILE`, JSON) holds only sha256 hashes of keys:

    {"keys": [{"sha256": "<hex>", "tenant": "acme", "role": "tenant",
               "quotas": {"max_adapters": 20, "max_adapter_bytes": 1073741824,
                          "max_concurrent_requests": 16, "max_queued_requests": 64}}]}

role is "tenant" or "admin" (admins may publish shared adapters). Quotas left out take the
server's defaults (`--tenant-max-*`). `lorafleet-server keys create` adds an entry and prints the
key once. The file is re-read on SIGHUP without dropping traffic: a bad file, or one with no keys
at all (which would lock every caller out), keeps the old table and logs why at ERROR. With no
keys file the server is single-tenant (tenant "default", admin) and refuses to bind beyond loopback.

A call carries exactly one `authorization: Bearer <key>` header (the scheme is case-insensitive,
RFC 7235); two authorization headers are refused rather than guessed between.
"""
from __future__ import annotations

import argparse
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.adapters.refs import SHARED_TENANT, validate_name
from server.errors import InvalidArgument, Unauthenticated

log = logging.getLogger(__name__)
SINGLE_TENANT = "default"
EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
MAX_KEYS_FILE_BYTES = 8 << 20


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; the defaults come from ServerConfig (--tenant-max-*)."""
    max_adapters: int
    max_adapter_bytes: int
    max_concurrent_requests: int
    max_queued_requests: int


QUOTA_KEYS = tuple(f.name for f in dataclasses.fields(Quotas))


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    quotas: Quotas


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


def bearer_token(value: object) -> str:
    """The key of an 'authorization: Bearer <key>' value ('' when it is not one)."""
    if not isinstance(value, str):
        return ""
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


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
            table = parse_keys_file(self.keys_file, self.defaults)
        except (OSError, InvalidArgument) as e:
            log.error("keeping the old API keys: %s", e)
            return
        if not table and self._table:
            log.error("keeping the old %d API keys: %s now holds no keys, which would lock every caller "
                      "out (to revoke every key, stop the server)", len(self._table), self.keys_file)
            return
        self._table = table
        log.info("reloaded %d API keys from %s", len(table), self.keys_file)

    def principal(self, metadata) -> Principal:
        if self.single_tenant:
            return Principal(SINGLE_TENANT, True, self.defaults)
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) > 1:
            raise Unauthenticated("send exactly one 'authorization' header (this call has "
                                  f"{len(values)})")
        token = bearer_token(values[0]) if values else ""
        if not token:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' metadata")
        digest = hash_key(token)
        for h, p in self._table.items():   # constant-time compare against every entry
            if hmac.compare_digest(h, digest):
                return p
        raise Unauthenticated("invalid API key")


_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("lorafleet_caller", default=None)


def caller() -> Principal:
    """The principal AuthInterceptor authenticated for the gRPC call being handled."""
    principal = _CALLER.get()
    if principal is None:                     # a handler reached without the interceptor: a bug
        raise RuntimeError("no authenticated caller: the call did not pass AuthInterceptor")
    return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call once, before any handler runs (health and reflection are open):
    an unknown key is UNAUTHENTICATED at once; a known one is the call's `caller()` (a context
    variable of the call's own task) for the handlers."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        try:
            principal = self.auth.principal(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            return _deny(str(e))
        handler = await continuation(handler_call_details)
        return _as_caller(handler, principal) if handler is not None else None


def _as_caller(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """The same handler, run with `caller()` set to `principal` (each call runs in its own task, so
    the value never leaks to another call)."""
    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        async def unary_unary(request, context):
            _CALLER.set(principal)
            return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, *args)
    if handler.unary_stream:
        async def unary_stream(request, context):
            _CALLER.set(principal)
            async for msg in handler.unary_stream(request, context):
                yield msg
        return grpc.unary_stream_rpc_method_handler(unary_stream, *args)
    if handler.stream_unary:
        async def stream_unary(request_iterator, context):
            _CALLER.set(principal)
            return await handler.stream_unary(request_iterator, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, *args)
    raise ValueError("bidirectional streaming methods are not served")


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def keys_main(argv: list[str]) -> int:
    """`lorafleet-server keys create --tenant NAME --file KEYS.json [--admin]`."""
    p = argparse.ArgumentParser(prog="lorafleet-server keys", description="Manage the server's API keys file.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="add a key for a tenant and print it (shown only this once)")
    c.add_argument("--tenant", required=True, help="tenant name: [a-z0-9][a-z0-9._-]{0,63}")
    c.add_argument("--admin", action="store_true", help="admin role (may publish shared adapters)")
    c.add_argument("--file", type=Path, required=True, help="the keys file (created if missing)")
    args = p.parse_args(argv)
    if args.tenant == SHARED_TENANT:
        print(f"lorafleet-server: tenant name {SHARED_TENANT!r} is reserved for shared adapters", file=sys.stderr)
        return 2
    try:
        key = create_key(args.file, args.tenant, args.admin)
    except (InvalidArgument, OSError, ValueError) as e:
        print(f"lorafleet-server: {e}", file=sys.stderr)
        return 2
    print(key)
    print(f"[added tenant {args.tenant!r}{' (admin)' if args.admin else ''} to {args.file}; this key is "
          "not stored anywhere and will not be shown again; send SIGHUP to the server to reload]",
          file=sys.stderr)
    return 0
