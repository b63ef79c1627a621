"""Wiring only: config -> model -> engine -> gRPC server (+ health, reflection, metrics)."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.pb.lorafleet.v1 import lorafleet_pb2 as pb
from client.pb.lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import metrics
from server.api.service import AdaptersService, Draining, InferenceService
from server.config import ServerConfig, config_from_args
from server.engine.engine import Engine
from server.model.default import ensure_default_model
from server.model.loader import LoadedModel, ModelLoadError, load_model

log = logging.getLogger("lorafleet")
SERVICES = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Inference", "Adapters")]


def pick_device(cfg: ServerConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lorafleet-server: --device cuda but no CUDA device is present")
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    if cfg.dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, cfg.dtype)


def load(cfg: ServerConfig) -> LoadedModel:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = cfg.model_dir or ensure_default_model(cfg.cache_dir, cfg.default_model)
    device, dtype = pick_device(cfg)
    return load_model(model_dir, device, dtype)


def build_engine(cfg: ServerConfig, loaded: LoadedModel) -> Engine:
    return Engine(loaded, cfg.max_batch_size, cfg.max_context_tokens, cfg.max_queued_requests,
                  cfg.max_prefill_tokens)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    engine: Engine
    health: health.aio.HealthServicer
    draining: Draining

    async def shutdown(self, grace: float) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get `grace` s."""
        self.draining.on = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.engine.stop()


async def start(cfg: ServerConfig, loaded: LoadedModel) -> RunningServer:
    engine = build_engine(cfg, loaded)
    engine.start()
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes)]
    server = grpc.aio.server(options=opts)
    draining = Draining()
    pb_grpc.add_InferenceServicer_to_server(InferenceService(cfg, engine, draining), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersService(), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(SERVICES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise SystemExit(f"lorafleet-server: cannot bind {cfg.host}:{cfg.port}")
    await server.start()
    for name in ["", *SERVICES]:
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    mport = metrics.serve_metrics(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    return RunningServer(server, port, mport, engine, hs, draining)


class BackgroundServer:
    """A server on its own event-loop thread (tests, benchmarks, the load test)."""

    def __init__(self, cfg: ServerConfig, loaded: LoadedModel):
        self.cfg, self.loaded = cfg, loaded
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> RunningServer:
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.cfg, self.loaded), self.loop).result(60)
        return self.running

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.running.shutdown(1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(cfg: ServerConfig) -> None:
    loaded = load(cfg)
    running = await start(cfg, loaded)
    a = loaded.model.args
    print(f"lorafleet: serving {loaded.name} ({a.n_layers} layers, hidden {a.dim}, vocab {a.vocab_size}, "
          f"{loaded.model.device}, {str(loaded.model.dtype).replace('torch.', '')}) "
          f"on {cfg.host}:{running.port}", flush=True)
    if running.metrics_port:
        print(f"lorafleet: metrics on http://{cfg.host}:{running.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"lorafleet: shutting down; in-flight requests get {cfg.shutdown_grace_s:g}s", flush=True)
    await running.shutdown(cfg.shutdown_grace_s)
    print("lorafleet: stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("configuration:\n%s", cfg.describe())
    try:
        asyncio.run(serve(cfg))
    except ModelLoadError as e:
        sys.exit(f"lorafleet-server: {e}")


if __name__ == "__main__":
    main()
