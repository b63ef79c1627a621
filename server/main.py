"""Wiring only: config -> model -> engine -> gRPC server (+ health, reflection, metrics)."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server import kernels, metrics, threads
from server.adapters.cache import AdapterCache
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.adapters.validate import AdapterLimits, value_bound
from server.api.adapters_service import AdaptersService
from server.api.auth import Authenticator, AuthInterceptor, Quotas, keys_main
from server.api.common import MalformedRequestInterceptor
from server.api.generation import Draining, Generation
from server.api.health import Health
from server.api.service import InferenceService
from server.api.tenancy import TenantLimiter
from server.config import ServerConfig, config_from_args, resolve_context
from server.engine.adapter_slots import AdapterSlots
from server.engine.engine import AdapterServing, Engine
from server.engine.kv_cache import KVCache
from server.http.connections import ConnectionLimits
from server.http.door import HttpDoor
from server.http.openai import OpenAIApp
from server.model.default import resolve_model
from server.model.loader import LoadedModel, ModelLoadError, load_model
from server.model.quantize import quantize_model
from server.net import check_ports_free, connection_caps, grpc_options, raise_fd_limit

log = logging.getLogger("lorafleet")
SERVICES = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Inference", "Adapters")]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS after every step: the
    engine frees and re-allocates the same activation sizes each step, and page faults on fresh
    memory cost up to a third of a CPU decode step. Costs resident memory; no-op off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))


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
    model_dir = resolve_model(cfg.model or None, cfg.cache_dir)
    device, dtype = pick_device(cfg)
    try:
        kernels.configure(cfg.kernels)
        kernels.select_backend(device, cfg.kernels)
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"--kernels {cfg.kernels}: {e}") from None
    loaded = load_model(model_dir, device, dtype)
    try:
        quantize_model(loaded.model, cfg.quantize)
    except ValueError as e:
        raise ModelLoadError(f"--quantize {cfg.quantize}: {e}") from None
    window = _sliding_window(loaded)
    if window and window < cfg.max_context_tokens:
        raise ModelLoadError(f"{model_dir}: sliding-window attention ({window} tokens) is not implemented; "
                             f"use --max-context-tokens {window} or less")
    return loaded


def _sliding_window(loaded: LoadedModel) -> int | None:
    window = loaded.hf_config.get("sliding_window")
    return window if loaded.hf_config.get("use_sliding_window", True) and window else None


def model_context(loaded: LoadedModel) -> int:
    """The longest context the model serves: its max_position_embeddings (2048 when the config has
    none), or its sliding window when that is shorter (not implemented beyond it)."""
    context = int(loaded.hf_config.get("max_position_embeddings") or 2048)
    return min(context, _sliding_window(loaded) or context)


CPU_KV_SHARE, CPU_KV_MAX, GPU_KV_SHARE = 0.25, 4 << 30, 0.8


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def kv_budget(cfg: ServerConfig, loaded: LoadedModel) -> int:
    """--kv-cache-bytes, or by default a share of free memory (80% of the free GPU memory once the
    model is loaded; on CPU a quarter of the available RAM, at most 4 GiB), never more than twice
    what --max-batch-size sequences of the whole context take (the second half: prefix cache)."""
    if cfg.kv_cache_bytes:
        return cfg.kv_cache_bytes
    m = loaded.model
    if m.device.type == "cuda":
        share = int(GPU_KV_SHARE * torch.cuda.mem_get_info(m.device)[0])
    else:
        share = min(int(CPU_KV_SHARE * _available_ram()), CPU_KV_MAX)
    per_token = KVCache.block_bytes(m.shape, 1, m.dtype)
    return min(share, 2 * cfg.max_batch_size * cfg.max_context_tokens * per_token)


def build_adapters(cfg: ServerConfig, loaded: LoadedModel) -> tuple[AdapterStore, AdapterServing]:
    """Store (scanned: corrupt versions quarantined) -> registry -> device slots <- tiered cache."""
    m = loaded.model
    bound = cfg.adapter_max_value or value_bound(torch.finfo(m.dtype).max, m.shape.hidden_size)
    limits = AdapterLimits(max_rank=cfg.max_adapter_rank, max_archive_bytes=cfg.max_adapter_bytes,
                           max_virtual_tokens=cfg.max_virtual_tokens, max_value=bound)
    store = AdapterStore(cfg.data_dir, m.shape, limits)
    report = store.scan()
    log.info("adapter store %s: %d versions served, %d quarantined", cfg.data_dir, len(report.served),
             len(report.quarantined))
    registry = AdapterRegistry(store, report.served)
    slots = AdapterSlots(m.shape, cfg.adapter_slots, cfg.max_adapter_rank, m.device, m.dtype, base=m.layers,
                         max_gain=bound)
    cache = AdapterCache(cfg.adapter_slots, cfg.host_adapters, cfg.host_adapter_bytes, registry.load, slots.write)
    return store, AdapterServing(registry, cache, slots)


def build_engine(cfg: ServerConfig, loaded: LoadedModel, adapters: AdapterServing | None) -> Engine:
    """The KV pool from the byte budget (`kv_budget`); it must hold one whole context. With an API
    keys file (several tenants) one row, and room for one prefill's blocks, are kept for a tenant
    with nothing running. `cfg` has its context resolved (resolve_context)."""
    m = loaded.model
    budget = kv_budget(cfg, loaded)
    block_bytes = KVCache.block_bytes(m.shape, cfg.kv_block_size, m.dtype)
    blocks = budget // block_bytes
    need = -(-cfg.max_context_tokens // cfg.kv_block_size)
    if blocks < need:
        raise SystemExit(f"lorafleet-server: the KV cache budget ({budget / 2**20:.1f} MiB: {blocks} blocks of "
                         f"{cfg.kv_block_size} tokens) cannot hold one sequence of the {cfg.max_context_tokens}-token "
                         f"context ({need * block_bytes / 2**20:.1f} MiB); raise --kv-cache-bytes or lower "
                         "--max-context-tokens")
    return Engine(loaded, cfg.max_batch_size, cfg.max_context_tokens, cfg.max_queued_requests,
                  cfg.max_prefill_tokens, adapters, cfg.decode_prefill_tokens,
                  reserve_slots=1 if cfg.api_keys is not None and cfg.max_batch_size > 1 else 0,
                  kv_blocks=blocks + 1, kv_block_size=cfg.kv_block_size, prefix_cache=not cfg.no_prefix_cache,
                  mask_threads=cfg.constraint_mask_threads, multi_tenant=cfg.api_keys is not None)


def kv_summary(engine: Engine, cfg: ServerConfig) -> str:
    b = engine.kv.blocks
    return (f"KV cache {engine.kv.nbytes / 2**30:.2f} GiB ({b.capacity} blocks of {b.block_size} tokens: "
            f"{b.capacity * b.block_size} tokens), context {cfg.max_context_tokens} tokens "
            f"(prompts up to {cfg.max_prompt_tokens}), prefix cache {'on' if b.prefix_cache else 'off'}")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    engine: Engine
    health: health.aio.HealthServicer
    draining: Draining
    auth: Authenticator
    metrics_http: object | None = None
    cfg: ServerConfig | None = None                     # the config served (context limits resolved)
    http: HttpDoor | None = None                        # the OpenAI-compatible door (--http-port)
    background: list = field(default_factory=list)     # asyncio tasks to cancel at shutdown

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def shutdown(self, grace: float) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get `grace` s."""
        self.draining.on = True
        for task in self.background:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http else []))
        self.engine.stop()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()


async def start(cfg: ServerConfig, loaded: LoadedModel) -> RunningServer:
    cfg = resolve_context(cfg, model_context(loaded))
    asyncio.get_running_loop().set_default_executor(     # asyncio.to_thread's workers: torch on one thread
        ThreadPoolExecutor(thread_name_prefix="lorafleet-io", initializer=threads.serial))
    metrics.configure(cfg.metrics_per_tenant, cfg.metrics_max_tenants, model_name=loaded.name,
                      max_context_tokens=cfg.max_context_tokens, max_lora=cfg.adapter_slots,
                      vllm_names=cfg.metrics_vllm_names == "on")
    store, adapters = build_adapters(cfg, loaded)
    engine = build_engine(cfg, loaded, adapters)
    engine.start()
    quotas = Quotas(cfg.tenant_max_adapters, cfg.tenant_max_adapter_bytes, cfg.tenant_max_concurrent,
                    cfg.tenant_max_queued)
    auth = Authenticator(cfg.api_keys, quotas)
    http_cap, grpc_cap = connection_caps(cfg)
    # a backstop below our own queue: excess calls are refused by gRPC before any Python handler runs
    server = grpc.aio.server(options=grpc_options(cfg, grpc_cap),
                             interceptors=[AuthInterceptor(auth), MalformedRequestInterceptor()],
                             maximum_concurrent_rpcs=cfg.max_queued_requests + cfg.max_batch_size + 64)
    draining = Draining()
    generation = Generation(cfg, engine, draining, adapters.registry, TenantLimiter(engine.queued))
    inference = InferenceService(cfg, engine, generation)
    pb_grpc.add_InferenceServicer_to_server(inference, server)
    pb_grpc.add_AdaptersServicer_to_server(
        AdaptersService(cfg, adapters.registry, store, engine, draining), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(SERVICES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = server.add_secure_port(f"{cfg.host}:{cfg.port}", _tls(cfg)) if cfg.tls_cert \
            else server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        engine.stop()
        raise SystemExit(f"lorafleet-server: cannot bind the gRPC port {cfg.host}:{cfg.port}")
    await server.start()
    for name in ["", *SERVICES]:
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_state = Health(draining, engine)
    health_state.follow_engine(hs, ["", *SERVICES], asyncio.get_running_loop())
    http = metrics.serve_metrics(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    mport = http.server_address[1] if http else None
    running = RunningServer(server, port, mport, engine, hs, draining, auth, http, cfg=cfg)
    if cfg.http_port >= 0:
        app = OpenAIApp(generation, auth, adapters.registry, loaded.name, cfg, health_state)
        limits = ConnectionLimits(http_cap, cfg.http_header_timeout_s, cfg.http_body_timeout_s)
        running.http = HttpDoor(app.app, cfg.host, cfg.http_port, limits, cfg.http_idle_timeout_s,
                                cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        await running.http.start()
    if cfg.rescan_interval_s > 0:
        running.background.append(asyncio.create_task(_rescan(adapters.registry, cfg.rescan_interval_s)))
    return running


async def _rescan(registry: AdapterRegistry, interval: float) -> None:
    """Follow a store shared by several replicas (see --rescan-interval-s)."""
    while True:
        await asyncio.sleep(interval)
        try:
            added, dropped = await asyncio.to_thread(registry.refresh)
        except Exception:  # noqa: BLE001 - keep serving what we have
            log.exception("adapter store rescan failed")
            continue
        if added or dropped:
            log.info("adapter store rescan: %d versions added, %d dropped", added, dropped)


def _tls(cfg: ServerConfig) -> grpc.ServerCredentials:
    ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


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
        threads.release_team()          # as serve(): the engine's team alone, until this thread computes again
        return self.running

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.running.shutdown(1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(cfg: ServerConfig) -> None:
    check_ports_free(cfg)
    loaded = load(cfg)
    running = await start(cfg, loaded)
    threads.release_team()              # one OpenMP team in the process: the engine thread's (server/threads.py)
    threads.serial()
    a = loaded.model.shape
    print(f"lorafleet: serving {loaded.name} ({a.num_layers} layers, hidden {a.hidden_size}, vocab {a.vocab_size}, "
          f"{loaded.model.device}, {str(loaded.model.dtype).replace('torch.', '')}, "
          f"{kernels.backend_name(loaded.model.device)} kernels{', chat template' if loaded.chat else ''}) "
          f"on {cfg.host}:{running.port}", flush=True)
    print(f"lorafleet: {kv_summary(running.engine, running.cfg)}", flush=True)
    if running.http_port is not None:
        print(f"lorafleet: OpenAI-compatible HTTP on {running.http.scheme}://{cfg.host}:{running.http_port}/v1",
              flush=True)
    if running.metrics_port:
        print(f"lorafleet: metrics on http://{cfg.host}:{running.metrics_port}/metrics", flush=True)
    if running.auth.single_tenant:
        print("lorafleet: no --api-keys: single-tenant mode (tenant 'default', admin), loopback only",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.auth.reload)
    await stop.wait()
    print(f"lorafleet: shutting down; in-flight requests get {cfg.shutdown_grace_s:g}s", flush=True)
    await running.shutdown(cfg.shutdown_grace_s)
    print("lorafleet: stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        sys.exit(keys_main(argv[1:]))
    cfg = config_from_args(argv)
    keep_freed_memory()
    raise_fd_limit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("configuration:\n%s", cfg.describe())
    try:
        asyncio.run(serve(cfg))
    except ModelLoadError as e:
        sys.exit(f"lorafleet-server: {e}")


if __name__ == "__main__":
    main()
