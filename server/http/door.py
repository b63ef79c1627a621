"""uvicorn serving the OpenAI app as one more task on the gRPC server's event loop.

We bind the socket ourselves (so `--http-port 0` has a port to report before the first request,
and a busy port is a clear start-up error) and run `uvicorn.Server.serve(sockets=[...])` as a
task. uvicorn does not install signal handlers here: the process's SIGTERM/SIGINT stay with
`server.main.serve`, which stops this door with the gRPC server.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path
from typing import Iterator

import uvicorn

STARTUP_TIMEOUT_S = 30.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The host process owns the signals (see the module docstring)."""
        yield


class HttpDoor:
    """`tls_cert`/`tls_key` serve HTTPS (the gRPC port's --tls-* files); `tls_client_ca` then
    requires client certificates signed by it (mutual TLS), as on the gRPC port."""

    def __init__(self, app, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None,
                 tls_client_ca: Path | None = None):
        self.sock = _bind(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        tls = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ca_certs=tls_client_ca,
                   ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE) if tls_cert else {}
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                server_header=False, timeout_graceful_shutdown=10, **tls)
        self.server = _EmbeddedServer(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
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
        """Stop accepting; requests in flight get `grace` seconds, then are cancelled (which
        cancels their sequences)."""
        if self.task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(grace, 0.1)
        self.server.should_exit = True
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"lorafleet-server: cannot bind the HTTP port {host}:{port}: {err}") from None
    sock.set_inheritable(True)
    return sock
