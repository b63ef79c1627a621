"""uvicorn serving the OpenAI app as one more task on the gRPC server's event loop.

We bind the socket ourselves (so `--http-port 0` has a port to report before the first request,
and a busy port is a clear start-up error) and run `uvicorn.Server.serve(sockets=[...])` as a
task. uvicorn does not install signal handlers here: the process's SIGTERM/SIGINT stay with
`server.main.serve`, which stops this door with the gRPC server. Connections are bounded
(`server.http.connections`): a cap, deadlines for a request's head and body, an idle timeout
between requests; WebSocket upgrades are off (no route needs them).

Stopping drains first: while requests are in flight the door keeps answering, so a new call gets
503 (the draining flag) and `/health` says 503 instead of the port going dark at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from pathlib import Path
from typing import Iterator

import uvicorn

from server.http.connections import BoundedH11Protocol, ConnectionLimits, quiet_accept_errors

STARTUP_TIMEOUT_S = 30.0
# the listen queue, and so the most connections asyncio accepts at once before the refused ones
# beyond the cap are closed: a burst can hold only this many file descriptors above the cap
ACCEPT_BATCH = 128
DRAIN_POLL_S = 0.05


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The host process owns the signals (see the module docstring)."""
        yield


class HttpDoor:
    """`tls_cert`/`tls_key` serve HTTPS (the gRPC port's --tls-* files); `tls_client_ca` then
    requires client certificates signed by it (mutual TLS), as on the gRPC port."""

    def __init__(self, app, host: str, port: int, limits: ConnectionLimits, idle_timeout_s: float,
                 tls_cert: Path | None = None, tls_key: Path | None = None, tls_client_ca: Path | None = None):
        self.sock = bind(host, port, "HTTP")
        self.port: int = self.sock.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        tls = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ca_certs=tls_client_ca,
                   ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE) if tls_cert else {}
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                server_header=False, timeout_graceful_shutdown=10, ws="none",
                                http=functools.partial(BoundedH11Protocol, limits=limits),
                                timeout_keep_alive=idle_timeout_s, backlog=ACCEPT_BATCH, **tls)
        self.server = _EmbeddedServer(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http-door")
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if self.task.done():
                self.task.result()                       # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {STARTUP_TIMEOUT_S:g}s")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Within `grace` seconds: keep serving while requests are in flight (the caller has set
        the draining flag, so new calls are refused with 503), then stop accepting; what still runs
        when `grace` is up is cancelled (which cancels its sequences)."""
        if self.task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.server.server_state.tasks and not self.task.done() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        self.server.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.1)
        self.server.should_exit = True
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()


def bind(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to host:port for exclusive use: SO_REUSEADDR (a port in TIME_WAIT is
    free) but never SO_REUSEPORT, so a port another server listens on is refused. Refused, it is
    one line and exit status 1 (SystemExit), not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"lorafleet-server: cannot bind the {what} port {host}:{port}: {err.strerror or err}") \
            from None
    sock.set_inheritable(True)
    return sock
