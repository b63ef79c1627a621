"""What every servicer shares: the one table from domain errors to gRPC status codes (with
`google.rpc` rich details), and the handler decorators that apply it and count the call.

Only bugs become INTERNAL (logged with a traceback, never shown to the caller). Running out of
file descriptors is RESOURCE_EXHAUSTED with one rate-limited log line, never INTERNAL. A message
shown to a caller is bounded (`MAX_MESSAGE_CHARS`) and always encodable, whatever it quotes.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError
from grpc_status import rpc_status

from server import errors as e
from server import metrics

log = logging.getLogger(__name__)
OVERLOAD_DELAY_S = 0.05
MAX_MESSAGE_CHARS = 1000
MAX_FIELD_CHARS = 200
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)

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
    e.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class RateLimitedLog:
    """At most one log line per `interval` seconds; the lines held back are counted in the next."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log) -> None:
        self.interval, self.logger, self.last, self.held = interval, logger, float("-inf"), 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        suffix = f" (+{self.held} more since the last line)" if self.held else ""
        self.last, self.held = now, 0
        self.logger.warning(message + suffix, *args)


FD_LOG = RateLimitedLog()


def status_of(err: BaseException) -> grpc.StatusCode:
    if out_of_fds(err):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def out_of_fds(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in OUT_OF_FDS


def is_bug(err: BaseException) -> bool:
    return status_of(err) == grpc.StatusCode.INTERNAL and not isinstance(err, e.LoraFleetError)


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` with lone surrogates escaped, cut to `limit` characters (ending in "…"): safe to send."""
    cut = len(text) > limit
    text = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit - 1] + "…" if cut or len(text) > limit else text


def public_message(err: BaseException) -> str:
    """What the caller is told: the domain error's text; for a bug only its type (the log has the rest)."""
    if is_bug(err):
        return f"internal error ({type(err).__name__}); the server log has details"
    if out_of_fds(err):
        return "the server is out of file descriptors (too many open connections or files); retry shortly"
    return bounded(str(err))


def log_failure(method: str, err: BaseException) -> None:
    """The server log's account of a failed call: a bug's traceback; one rate-limited line for
    fd exhaustion; nothing for the caller's own mistakes."""
    if is_bug(err):
        log.error("%s failed", method, exc_info=err)
    elif out_of_fds(err):
        FD_LOG.warning("%s refused: out of file descriptors (%s)", method, err)


def rich_status(err: BaseException) -> status_pb2.Status:
    """google.rpc.Status for a domain error: QuotaFailure for quotas, BadRequest for a field."""
    code = status_of(err)
    message = public_message(err)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    detail = None
    if isinstance(err, e.QuotaExceeded):
        detail = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=err.subject, description=message)])
    elif isinstance(err, e.InvalidField):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=bounded(err.field, MAX_FIELD_CHARS),
                                                        description=message)])
    if detail is not None:
        status.details.add().Pack(detail)
    return status


async def abort(context: grpc.aio.ServicerContext, method: str, err: BaseException) -> None:
    """End the call with the status of `err` (never returns)."""
    code = status_of(err)
    metrics.REQUESTS.labels(method, code.name, "grpc").inc()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Server-side back-off: a client that retries at once cannot turn rejections into a busy
        # loop that starves the engine thread (GIL and CPU); the answer stays quick and explicit.
        await asyncio.sleep(OVERLOAD_DELAY_S)
    log_failure(method, err)
    try:
        await context.abort_with_status(rpc_status.to_status(rich_status(err)))
    except ExecuteBatchError:
        if not _deadline_passed(context, err):
            raise
        # gRPC ended the call at its deadline while the engine was ending it too: there is no one
        # left to send a status to. End the handler as a cancelled call, which gRPC logs at debug.
        raise asyncio.CancelledError() from None


def _deadline_passed(context: grpc.aio.ServicerContext, err: BaseException) -> bool:
    remaining = context.time_remaining()
    return isinstance(err, e.DeadlineExceeded) or (remaining is not None and remaining <= 0)


PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError)


def unary(method: str, on_error: Callable[[BaseException], None] | None = None):
    """For a unary-response handler (unary or client-streaming request): map domain errors to
    status codes and count the call. `on_error(err)` runs first on a failure (e.g. a metric)."""
    def wrap(fn: Callable[..., Awaitable]):
        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                resp = await fn(self, request, context)
            except PASS_THROUGH:
                raise
            except Exception as err:  # noqa: BLE001 - mapped to a status, bugs to INTERNAL
                if on_error is not None:
                    on_error(err)
                await abort(context, method, err)
            metrics.REQUESTS.labels(method, "OK", "grpc").inc()
            return resp
        return handler
    return wrap


def streaming(method: str):
    """The same for a server-streaming handler (an async generator)."""
    def wrap(fn: Callable[..., AsyncIterator]):
        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                async for msg in fn(self, request, context):
                    yield msg
            except PASS_THROUGH:
                raise
            except Exception as err:  # noqa: BLE001
                await abort(context, method, err)
            metrics.REQUESTS.labels(method, "OK", "grpc").inc()
        return handler
    return wrap


class _Malformed:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, err: Exception) -> None:
        self.err = err


MALFORMED_LOG = RateLimitedLog()


def _malformed_message(method: str, err: Exception) -> str:
    return (f"the request bytes are not a valid {method.rsplit('/', 1)[-1]} message "
            f"({type(err).__name__}: {str(err)[:120]}); send a protobuf message built from lorafleet.proto")


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse (invalid UTF-8 in a string field, truncation) answer
    INVALID_ARGUMENT with one rate-limited log line, instead of gRPC's UNKNOWN/INTERNAL and a
    traceback per call: the handler sees the parse error as a domain error."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def safe(data: bytes):
            try:
                return parse(data)
            except Exception as err:  # noqa: BLE001 - any parse failure is the caller's
                return _Malformed(err)

        def refuse(request: _Malformed) -> None:
            MALFORMED_LOG.warning("%s: malformed request refused (%s)", method, type(request.err).__name__)
            raise e.InvalidArgument(_malformed_message(method, request.err))

        out = handler.response_serializer
        if handler.unary_unary:
            async def unary_unary(request, context):
                if isinstance(request, _Malformed):
                    await _refuse_now(context, method, refuse, request)
                return await handler.unary_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, safe, out)
        if handler.unary_stream:
            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await _refuse_now(context, method, refuse, request)
                async for msg in handler.unary_stream(request, context):
                    yield msg
            return grpc.unary_stream_rpc_method_handler(unary_stream, safe, out)
        if handler.stream_unary:
            async def stream_unary(request_iterator, context):
                async def checked():
                    async for request in request_iterator:
                        if isinstance(request, _Malformed):
                            refuse(request)
                        yield request
                return await handler.stream_unary(checked(), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, safe, out)
        return handler


async def _refuse_now(context, method: str, refuse, request: _Malformed) -> None:
    try:
        refuse(request)
    except e.InvalidArgument as err:
        await abort(context, method.rsplit("/", 1)[-1], err)
