"""A locust User that speaks lorafleet's gRPC API (locust's documented gRPC pattern).

1. `grpc.experimental.gevent.init_gevent()` before any channel exists, so grpc yields to gevent.
2. Each user owns one channel wrapped in `LocustInterceptor`, which times every call and fires
   `environment.events.request` with request_type="grpc", name = the method, and the exception
   (a `GrpcFailure` whose text starts with the status code name) when the call failed.
3. Server-streaming calls fire twice: `ttft:<Method>` when the first message arrives (time to first
   token), and `<Method>` when the stream ends.

`response_length` is the number of generated tokens for Generate / GenerateStream (so locust's
"average content size" times request count is tokens), and bytes sent for uploads.

Codes in `tolerated` (UNIMPLEMENTED unless --strict) are not failures: they are counted under
"<Method> [<CODE>]", so features that have not landed yet show up without failing the run.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402 - after init_gevent
from locust import User  # noqa: E402

from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc  # noqa: E402


class GrpcFailure(Exception):
    """A failed call as locust records it: "CODE: details" (run.py groups failures by CODE)."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        self.code, self.details = code, (details or "")[:120]
        super().__init__(f"{code.name}: {self.details}")

    def __repr__(self) -> str:
        return str(self)


def _tokens(msg: Any) -> int:
    usage = getattr(msg, "usage", None)
    return usage.completion_tokens if usage is not None else 0


class _TimedStream:
    """Wraps a server-streaming call: fires ttft on the first message, the call at the end."""

    def __init__(self, call, fire, name: str, t0: float):
        self._call, self._fire, self._name, self._t0 = call, fire, name, t0
        self._first, self._tokens, self._done = True, 0, False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            msg = next(self._call)
        except StopIteration:
            self._end(None)
            raise
        except grpc.RpcError as e:
            self._end(e)
            raise
        if self._first:
            self._first = False
            self._fire(f"ttft:{self._name}", self._t0, 0, None)
        self._tokens = _tokens(msg) or self._tokens + len(getattr(msg, "token_ids", ()))
        return msg

    def _end(self, error: grpc.RpcError | None) -> None:
        if not self._done:
            self._done = True
            self._fire(self._name, self._t0, self._tokens, error)

    def cancel(self) -> bool:
        return self._call.cancel()


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor):
    def __init__(self, environment, tolerated: frozenset[grpc.StatusCode]):
        self.environment, self.tolerated = environment, tolerated

    def _fire(self, name: str, t0: float, length: int, error: grpc.RpcError | None) -> None:
        exception = None
        if error is not None:
            code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
            if code in self.tolerated:
                name = f"{name} [{code.name}]"
            else:
                exception = GrpcFailure(code, error.details() if hasattr(error, "details") else str(error))
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length, response=None, context={}, exception=exception)

    def intercept_unary_unary(self, continuation, details, request):
        t0 = time.perf_counter()
        call = continuation(details, request)
        try:
            resp = call.result()
        except grpc.RpcError as e:
            self._fire(_method(details), t0, 0, e)
        else:
            self._fire(_method(details), t0, _tokens(resp), None)
        return call

    def intercept_stream_unary(self, continuation, details, request_iterator):
        sent = [0]

        def counting(it):
            for msg in it:
                sent[0] += msg.ByteSize()
                yield msg

        t0 = time.perf_counter()
        call = continuation(details, counting(request_iterator))
        try:
            call.result()
        except grpc.RpcError as e:
            self._fire(_method(details), t0, sent[0], e)
        else:
            self._fire(_method(details), t0, sent[0], None)
        return call

    def intercept_unary_stream(self, continuation, details, request):
        t0 = time.perf_counter()
        return _TimedStream(continuation(details, request), self._fire, _method(details), t0)


def _method(details) -> str:
    return details.method.rsplit("/", 1)[-1]


class GrpcUser(User):
    """One channel per user; `self.inference` and `self.adapters` are intercepted stubs."""

    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        strict = getattr(environment.parsed_options, "strict", False)
        tolerated = frozenset() if strict else frozenset({grpc.StatusCode.UNIMPLEMENTED})
        self._channel = grpc.insecure_channel(self.host)
        channel = grpc.intercept_channel(self._channel, LocustInterceptor(environment, tolerated))
        self.inference = pb_grpc.InferenceStub(channel)
        self.adapters = pb_grpc.AdaptersStub(channel)

    def on_stop(self) -> None:
        self._channel.close()
