"""The one table from domain errors to gRPC status codes. Only bugs become INTERNAL."""
from __future__ import annotations

import grpc

from server import errors as e

STATUS: dict[type[e.LoraFleetError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_of(err: BaseException) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL
