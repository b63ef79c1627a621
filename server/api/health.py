"""One answer to "is this replica serving?" for both doors: gRPC health (`grpc.health.v1`, every
service name) and the HTTP door's `GET /health`.

Serving means: not draining (SIGTERM: new calls get UNAVAILABLE while those in flight finish), and
the engine loop running: not restarting after a bug (its supervisor reports False, then True once
the loop runs again) and not down for good (it failed too often, or its thread ended).
"""
from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from server.api.generation import Draining
from server.engine.engine import Engine

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, draining: Draining, engine: Engine):
        self.draining, self.engine = draining, engine
        self.engine_serving = True             # the engine's last on_health report

    def problem(self) -> str | None:
        """None while serving; else why not, in words a caller can act on."""
        if self.draining.on:
            return "the server is shutting down (draining); retry on another replica"
        if not self.engine.alive:
            return "the engine failed and stays down; the server needs a restart"
        if not self.engine_serving:
            return "the engine is restarting after an internal error; retry shortly"
        return None

    def follow_engine(self, servicer: health.aio.HealthServicer, services: list[str],
                      loop: asyncio.AbstractEventLoop) -> None:
        """Keep `problem()` and the gRPC servicer's status of `services` in step with the engine's
        reports (made on the engine thread; the servicer is set on its event loop). Once draining,
        the servicer stays NOT_SERVING (enter_graceful_shutdown)."""
        def on_health(serving: bool) -> None:
            self.engine_serving = serving
            if not self.draining.on:
                for name in services:
                    asyncio.run_coroutine_threadsafe(servicer.set(name, SERVING if serving else NOT_SERVING), loop)
        self.engine.on_health.append(on_health)
