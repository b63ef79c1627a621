"""How adapters and tenants are named: the name rule, `name[@N]` references and `AdapterKey`.

Every path built from user text passes `validate_name` first. A request names an adapter as
`name` (latest version), `name@N` (pinned) or `shared/name[@N]` (published by an admin); once
resolved, a version is identified by an `AdapterKey`, printed as `tenant/name@N`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from server.errors import InvalidArgument

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}", re.ASCII)
SHARED_TENANT = "shared"       # the namespace of adapters an admin published for every tenant
MAX_REF_CHARS = 200


def validate_name(name: object, what: str = "name") -> str:
    """Adapter or tenant name: [a-z0-9][a-z0-9._-]{0,63}, ASCII; InvalidArgument otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)[:80]
        raise InvalidArgument(f"invalid {what} {shown}: must be 1-64 characters of a-z 0-9 . _ -, "
                              "starting with a letter or digit")
    return name


def parse_ref(ref: object) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@N' -> (name, N) with N a positive integer."""
    if not isinstance(ref, str):
        raise InvalidArgument("adapter reference must be a string 'name' or 'name@N'")
    name, at, version = ref.partition("@")
    validate_name(name, "adapter name")
    if not at:
        return name, None
    if not VERSION_RE.fullmatch(version):
        raise InvalidArgument(f"invalid adapter version {version[:20]!r} in {ref[:80]!r}: "
                              "expected name@N with N a positive integer")
    return name, int(version)


@dataclass(frozen=True)
class TenantRef:
    """A caller's reference resolved to a namespace: 'name[@N]' or 'shared/name[@N]'."""

    tenant: str
    name: str
    version: int | None

    @property
    def display(self) -> str:
        """How the caller spells it (shared adapters keep their 'shared/' prefix)."""
        prefix = f"{SHARED_TENANT}/" if self.tenant == SHARED_TENANT else ""
        return prefix + self.name + (f"@{self.version}" if self.version is not None else "")


def parse_tenant_ref(caller_tenant: str, ref: object) -> TenantRef:
    """A request's adapter reference in the caller's namespace, or 'shared/...'."""
    if isinstance(ref, str) and len(ref) > MAX_REF_CHARS:
        raise InvalidArgument(f"adapter reference longer than {MAX_REF_CHARS} characters")
    if isinstance(ref, str) and ref.startswith(SHARED_TENANT + "/"):
        tenant, ref = SHARED_TENANT, ref[len(SHARED_TENANT) + 1:]
    else:
        tenant = validate_name(caller_tenant, "tenant name")
    name, version = parse_ref(ref)
    return TenantRef(tenant, name, version)


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One stored version of one tenant's adapter; `str(key)` is 'tenant/name@N'."""

    tenant: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"

    @staticmethod
    def parse(text: str) -> "AdapterKey":
        """'tenant/name@N' -> AdapterKey; InvalidArgument otherwise."""
        tenant, _, rest = text.partition("/")
        name, _, version = rest.partition("@")
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        if not VERSION_RE.fullmatch(version):
            raise InvalidArgument(f"invalid adapter key {text[:140]!r}: expected tenant/name@N")
        return AdapterKey(tenant, name, int(version))
