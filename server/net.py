"""The process's network limits: the open-file limit, each door's connection cap, the gRPC
server's channel arguments, and the check that every fixed port is free before the model loads."""
from __future__ import annotations

import resource

from server.config import ServerConfig
from server.http.door import bind

FD_RESERVE = 256                 # file descriptors kept from the connection caps: store, model, logs, threads
MAX_DERIVED_CONNECTIONS = 4096   # per door, when its cap is derived from the open-file limit


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (systemd's default soft limit, 1,024, is far
    below what a server's connections need); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((hard, 1 << 20) if soft != hard else ()):   # an unlimited hard limit may refuse itself
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_caps(cfg: ServerConfig) -> tuple[int, int]:
    """(HTTP, gRPC) connection caps: the flags, or else each door a half of the open-file limit
    less FD_RESERVE, so that connections alone never exhaust the process's file descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    share = max(16, min(MAX_DERIVED_CONNECTIONS, (soft - FD_RESERVE) // 2))
    return cfg.http_max_connections or share, cfg.grpc_max_connections or share


def grpc_options(cfg: ServerConfig, max_connections: int) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes, an exclusive port, the connection cap,
    handshake deadline, keepalive, idle and age limits (a 0 knob leaves gRPC's default: never)."""
    def ms(seconds: float) -> int:
        return int(seconds * 1000)
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", ms(cfg.grpc_handshake_timeout_s))]
    if cfg.grpc_keepalive_time_s > 0:
        opts += [("grpc.keepalive_time_ms", ms(cfg.grpc_keepalive_time_s)),
                 ("grpc.keepalive_timeout_ms", ms(cfg.grpc_keepalive_timeout_s))]
    if cfg.grpc_max_connection_idle_s > 0:
        opts.append(("grpc.max_connection_idle_ms", ms(cfg.grpc_max_connection_idle_s)))
    if cfg.grpc_max_connection_age_s > 0:
        opts += [("grpc.max_connection_age_ms", ms(cfg.grpc_max_connection_age_s)),
                 ("grpc.max_connection_age_grace_ms", ms(cfg.grpc_max_connection_age_grace_s))]
    return opts


def check_ports_free(cfg: ServerConfig) -> None:
    """Every fixed port bound exclusively once before the model loads: a port in use is one line
    and exit status 1, with nothing started to tear down (the real binds are exclusive too)."""
    for what, port in (("gRPC", cfg.port), ("HTTP", cfg.http_port), ("metrics", cfg.metrics_port)):
        if port > 0:
            bind(cfg.host, port, what).close()
