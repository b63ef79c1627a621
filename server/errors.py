"""Domain errors. Each maps to exactly one gRPC status code in `server/api/common.py`.

Raise the most specific class; the message is shown to the caller verbatim, so it
must say what was wrong and, where there is one, what the limit is.
"""
from __future__ import annotations


class LoraFleetError(Exception):
    """Base of every error the server reports to a caller on purpose."""


class InvalidArgument(LoraFleetError):
    """The request itself is malformed or out of range (-> INVALID_ARGUMENT)."""


class NotFound(LoraFleetError):
    """The named thing does not exist for this caller (-> NOT_FOUND)."""


class AlreadyExists(LoraFleetError):
    """The thing to create exists already (-> ALREADY_EXISTS)."""


class FailedPrecondition(LoraFleetError):
    """Well-formed, but does not fit the server's state or base model (-> FAILED_PRECONDITION)."""


class ResourceExhausted(LoraFleetError):
    """A quota, cap or queue is full (-> RESOURCE_EXHAUSTED)."""


class PermissionDenied(LoraFleetError):
    """The caller is known but may not do this (-> PERMISSION_DENIED)."""


class Unauthenticated(LoraFleetError):
    """The caller could not be identified (-> UNAUTHENTICATED)."""


class Unavailable(LoraFleetError):
    """The server is shutting down or its engine has stopped (-> UNAVAILABLE)."""


class DataLoss(LoraFleetError):
    """Stored data failed verification (-> DATA_LOSS)."""


class DeadlineExceeded(LoraFleetError):
    """The caller's deadline passed before the request finished."""


class QuotaExceeded(ResourceExhausted):
    """A per-tenant quota (not a server-wide limit) refused the call."""

    def __init__(self, message: str, subject: str, quota: str) -> None:
        super().__init__(message)
        self.subject = subject        # e.g. "tenant:acme"
        self.quota = quota            # the quota's name, e.g. "max_adapters"


class InvalidField(InvalidArgument):
    """One request field is wrong (reported as a google.rpc.BadRequest field violation)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
