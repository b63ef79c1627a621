"""Bounded HTTP connections: a cap on how many are open, and a deadline on each phase of a request.

uvicorn's own knobs cover the idle wait between two requests (`timeout_keep_alive`) but not a
connection that sends nothing, a head sent a byte a minute (slowloris), or a body that stalls;
`limit_concurrency` answers 503 only once a request has arrived, after the connection was
accepted. `BoundedH11Protocol` adds what is missing to uvicorn's h11 protocol:

- cap: a connection beyond `max_connections` gets a 503 and is closed before it is read;
- head deadline: a request's line and headers must be complete `header_timeout_s` after the
  connection opened (its first request) or after the first byte of the next request;
- body deadline: the whole body must be in `body_timeout_s` after the head;
- on a missed deadline, a 408 (if no response has started) and the connection is closed.

Running out of file descriptors while accepting is one rate-limited log line (`quiet_accept_errors`)
instead of asyncio's traceback for every failed accept.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server import metrics
from server.api.common import RateLimitedLog

log = logging.getLogger(__name__)
REFUSED_LOG = RateLimitedLog(logger=log)
ACCEPT_LOG = RateLimitedLog(logger=log)
WARNINGS_LOG = RateLimitedLog(logger=log)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float


def _raw_response(status: str, headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n{headers}\r\n").encode("ascii")


BUSY = _raw_response("503 Service Unavailable", "retry-after: 1\r\n")
TIMED_OUT = _raw_response("408 Request Timeout")


class _RateLimitedWarnings:
    """uvicorn's logger, but its per-request warnings ("Invalid HTTP request received.", ...), which
    any client can cause, at most one line per interval."""

    def __init__(self, logger) -> None:
        self._logger = logger

    def warning(self, message: str, *args: object) -> None:
        WARNINGS_LOG.warning("HTTP: " + message, *args)

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with `ConnectionLimits` (see the module docstring)."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _RateLimitedWarnings(self.logger)
        self.limits = limits
        self.refused = False
        self.phase: str | None = None               # "header" | "body" while a deadline runs
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.refused, self.transport = True, transport
            metrics.HTTP_CONNECTIONS_CLOSED.labels("limit").inc()
            REFUSED_LOG.warning("HTTP: %d connections open, the limit (--http-max-connections); refusing new ones",
                                len(self.connections))
            transport.write(BUSY)
            transport.close()
            return
        super().connection_made(transport)
        metrics.HTTP_CONNECTIONS.inc()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        if self.refused:
            return
        metrics.HTTP_CONNECTIONS.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Start, keep or stop the deadline for where the client's side of the exchange is now."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._set_phase("body")
        elif state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
            self._set_phase("header")               # the first request, or a next one begun
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self.phase:
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.phase = phase
        if phase is not None:
            timeout = self.limits.header_timeout_s if phase == "header" else self.limits.body_timeout_s
            self.deadline = self.loop.call_later(timeout, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self.deadline, self.phase = None, None
        if self.transport.is_closing():
            return
        metrics.HTTP_CONNECTIONS_CLOSED.labels(f"{phase}_timeout").inc()
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TIMED_OUT)
        self.transport.close()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Turn asyncio's report of a failed accept (out of file descriptors: one traceback per
    attempt, thousands a second) into one rate-limited line; other reports go where they went."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            ACCEPT_LOG.warning("HTTP: cannot accept new connections: %s", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    loop.set_exception_handler(handler)
