"""Issue 20, the doors: bodies that cannot be amplified and connections that cannot be hoarded,
tried from outside over real sockets (HTTP door, gRPC port, metrics port) and, where the behaviour
is the process's, against `python -m server --model tiny` subprocesses. Each test failed on the
code before the fix (findings 3, 4, 6, 7 and 10 of the attack run)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from grpc._cython.cygrpc import ExecuteBatchError
from prometheus_client import REGISTRY

from client import LoraFleetClient
from server import errors
from server.api import common
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.serving_fixtures import make_adapter

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 30.0
MODEL = "tiny-chat"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def chat_loaded(chat_model_dir):
    return load_model(chat_model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def door(chat_loaded, tmp_path_factory):
    """A server whose HTTP door has short deadlines and small buffers, so tests can outlast them."""
    cfg = make_config(tmp_path_factory.mktemp("doors"), http_port=0, max_message_bytes=1 << 20,
                      http_header_timeout_s=1.0, http_body_timeout_s=1.5, http_idle_timeout_s=1.0,
                      http_max_buffered_bytes=1536 * 1024)
    with BackgroundServer(cfg, chat_loaded) as running:
        yield running


def post(running, path: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=f"http://127.0.0.1:{running.http_port}", timeout=WAIT_S) as c:
        return c.post(path, content=body, headers=JSON)


def no_errors_logged(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def wait_until(predicate, what: str, deadline_s: float = WAIT_S) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"waited {deadline_s:g}s for {what}"
        time.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- finding 3: depth
@pytest.mark.parametrize("depth", [33, 1000, 8000])
def test_deeply_nested_json_is_400_naming_the_depth_limit(door, caplog, depth):
    body = b'{"model": "tiny-chat", "prompt": "hi", "stop": ' + b"[" * depth + b"]" * depth + b"}"
    r = post(door, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and "32 deep" in err["message"] and "--max-json-depth" in err["message"]
    assert not no_errors_logged(caplog)


def test_nesting_within_the_limit_reaches_validation(door):
    body = b'{"model": "tiny-chat", "prompt": "hi", "stop": ' + b"[" * 31 + b"]" * 31 + b"}"
    r = post(door, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop"), r.text


# ---------------------------------------------------------------- finding 4: lone surrogates
SURROGATE = "\ud800"


@pytest.mark.parametrize("path, doc, param", [
    ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": [f"a{SURROGATE}"]}, "prompt[0]"),
    ("/v1/completions", {"prompt": "hi", "model": SURROGATE}, "model"),
    ("/v1/completions", {"prompt": "hi", "user": SURROGATE}, "user"),
    ("/v1/completions", {"prompt": "hi", "stop": SURROGATE}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", SURROGATE]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": [{"role": SURROGATE, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"x{SURROGATE}y"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages[0].content[0].text"),
])
def test_a_lone_surrogate_in_any_string_is_400_naming_the_field(door, caplog, path, doc, param):
    body = json.dumps({"model": MODEL, **doc}).encode()       # ensure_ascii: the JSON says "\ud800"
    assert b"\\ud800" in body
    r = post(door, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "lone surrogate" in err["message"], err
    assert not no_errors_logged(caplog)


def test_a_surrogate_as_raw_bytes_is_400_too(door):
    """json.loads decodes CESU-style bytes (ED A0 80) to the same lone surrogate."""
    r = post(door, "/v1/completions", b'{"model": "tiny-chat", "prompt": "a\xed\xa0\x80"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


# ---------------------------------------------------------------- finding 6: counts and echoes
def test_a_body_of_many_tiny_messages_is_refused_before_parsing(door, caplog):
    msgs = [{"role": "user", "content": "x"}] * 30_000
    body = json.dumps({"model": MODEL, "messages": msgs}).encode()
    assert len(body) < 1 << 20
    r = post(door, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "--max-json-items" in err["message"] and "8192" in err["message"]
    assert not no_errors_logged(caplog)


def test_message_count_is_checked_before_any_message(door):
    """65 messages, the first of them invalid: the answer is the count, so no message was built."""
    msgs = [{"role": 42, "content": "x"}] + [{"role": "user", "content": "x"}] * 64
    r = post(door, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": msgs}).encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "65 entries; at most 64" in err["message"], err


def test_a_huge_logit_bias_is_refused_without_echoing_it(door):
    body = json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {str(i): 1.0 for i in range(60_000)}}).encode()
    r = post(door, "/v1/completions", body)
    assert r.status_code == 400 and len(r.content) < 1000, r.text[:300]
    small = json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {str(i): 1.0 for i in range(2000)}}).encode()
    r = post(door, "/v1/completions", small)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "logit_bias" and len(r.content) < 1000, r.text[:300]
    assert "2000 entries" in err["message"]


@pytest.mark.parametrize("doc", [
    {"prompt": "hi", "x" * 50_000: 1},                        # an unknown field's name
    {"prompt": "hi", "n": "9" * 30_000},                      # a no-op field's value
    {"prompt": "hi", "temperature": "hot" * 20_000},          # a mistyped value
])
def test_errors_never_echo_unbounded_input(door, doc):
    r = post(door, "/v1/completions", json.dumps({"model": MODEL, **doc}).encode())
    err = r.json()["error"]
    assert r.status_code == 400 and len(r.content) < 1500, r.text[:300]
    assert "…" in err["message"] or len(err["message"]) < 300


def test_public_messages_are_bounded_and_encodable():
    """The backstop for both doors: whatever a domain error quotes, the caller gets <= 1,000 chars."""
    msg = common.public_message(errors.InvalidArgument("bad value " + "\ud800" * 5000))
    assert len(msg) <= common.MAX_MESSAGE_CHARS and msg.endswith("…")
    msg.encode("utf-8")
    field = common.rich_status(errors.InvalidField("f" * 5000, "x")).details[0]
    assert len(field.value) < 600


# ---------------------------------------------------------------- finding 7: HTTP connections
def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails (socket timeout) if it never does."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_silent_connection_is_closed_after_the_header_timeout(door):
    before = sample("lorafleet_http_connections_closed_total", reason="header_timeout")
    with connect(door.http_port) as s:
        assert read_until_closed(s).startswith(b"HTTP/1.1 408")
    assert sample("lorafleet_http_connections_closed_total", reason="header_timeout") == before + 1


def test_slowloris_a_head_sent_a_byte_at_a_time_is_closed(door):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 1000
    with connect(door.http_port) as s:
        end = time.monotonic() + WAIT_S
        with pytest.raises(OSError):          # the server closes while bytes are still coming
            for i in range(len(head)):
                assert time.monotonic() < end, "the server kept a trickling head open"
                s.send(head[i:i + 1])
                time.sleep(0.05)


def test_an_idle_keepalive_connection_is_closed(door):
    with connect(door.http_port) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(s).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_is_closed_and_its_buffer_freed(door):
    """Bodies of all requests may buffer 1.5 MiB together: two stalled 1 MiB bodies cannot both
    hold theirs (the second is 429), and once the body timeout closes them a full body fits again."""
    size = 1 << 20
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    with connect(door.http_port) as first, connect(door.http_port) as second:
        first.sendall(head + b'{"model": "tiny-chat", "prompt": "')
        time.sleep(0.2)      # not a timing assertion: only lets the first head reach the app first
        second.sendall(head + b'{"model": "tiny-chat"')
        answers = read_until_closed(second), read_until_closed(first)
    assert any(a.startswith(b"HTTP/1.1 429") and b"--http-max-buffered-bytes" in a for a in answers), answers
    assert any(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    r = post(door, "/v1/completions", b'{"model": "tiny-chat", "prompt": "' + b"y" * (size - 60) + b'"}')
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text   # parsed, not 429


@pytest.fixture()
def capped(chat_loaded, tmp_path):
    cfg = make_config(tmp_path, http_port=0, http_max_connections=4, http_header_timeout_s=60.0)
    with BackgroundServer(cfg, chat_loaded) as running:
        yield running


def test_connections_beyond_the_cap_get_503_and_are_closed(capped):
    base = sample("lorafleet_http_connections")
    held = [connect(capped.http_port) for _ in range(4)]
    try:
        wait_until(lambda: sample("lorafleet_http_connections") == base + 4, "4 connections open")
        with connect(capped.http_port) as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer
        held.pop().close()
        wait_until(lambda: sample("lorafleet_http_connections") == base + 3, "a connection to close")
        with httpx.Client(base_url=f"http://127.0.0.1:{capped.http_port}", timeout=WAIT_S) as c:
            assert c.get("/v1/models").status_code == 200
    finally:
        for s in held:
            s.close()


# ---------------------------------------------------------------- finding 7: gRPC connections
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])   # + empty SETTINGS


@pytest.fixture()
def grpc_short(tiny_loaded, tmp_path):
    cfg = make_config(tmp_path, grpc_handshake_timeout_s=1.0, grpc_max_connection_idle_s=2.0)
    with BackgroundServer(cfg, tiny_loaded) as running:
        yield running


def test_a_grpc_connection_that_never_handshakes_is_closed(grpc_short):
    with connect(grpc_short.port) as s:
        assert b"handshake timeout" in read_until_closed(s)


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in `data` (9-byte headers: length 3, type 1, flags 1, stream 4)."""
    types, i = [], 0
    while i + 9 <= len(data):
        types.append(data[i + 3])
        i += 9 + int.from_bytes(data[i:i + 3], "big")
    return types


def test_an_idle_grpc_connection_is_sent_away(grpc_short):
    with connect(grpc_short.port) as s:
        s.sendall(H2_PREFACE)
        frames = read_until_closed(s)
    assert 7 in frame_types(frames) and b"idle" in frames, frames                # 7 = GOAWAY
    with LoraFleetClient(f"127.0.0.1:{grpc_short.port}", timeout=WAIT_S) as c:   # clients just reconnect
        assert c.generate("hi", max_new_tokens=2).completion_tokens >= 1


def test_grpc_options_bind_exclusively_and_bound_connections():
    from server.net import grpc_options
    cfg = make_config(Path("/nonexistent"), grpc_max_connection_age_s=0, grpc_keepalive_time_s=30)
    opts = dict(grpc_options(cfg, 77))
    assert opts["grpc.so_reuseport"] == 0 and opts["grpc.max_allowed_incoming_connections"] == 77
    assert opts["grpc.keepalive_time_ms"] == 30_000 and opts["grpc.max_connection_idle_ms"] == 300_000
    assert "grpc.max_connection_age_ms" not in opts
    assert dict(grpc_options(make_config(Path("/x")), 1))["grpc.max_connection_age_grace_ms"] == 300_000


# ---------------------------------------------------------------- subprocess servers
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")])}


class PythonServer:
    """`python -m server --model tiny ...`, its stdout and stderr in files (a pipe left unread
    could block it)."""

    def __init__(self, tmp_path: Path, cache: Path, *flags: str, nofile: tuple[int, int] | None = None):
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "server", "--model", "tiny", "--cache-dir", str(cache),
                                          "--data-dir", str(tmp_path / "data"), *flags], cwd=REPO, env=ENV,
                                         stdout=out, stderr=err, preexec_fn=limit)

    def ports(self) -> dict[str, int]:
        """The ports it printed once serving: {'grpc': .., 'http': ..}."""
        end = time.monotonic() + WAIT_S * 2
        while True:
            text = self.out.read_text()
            if "OpenAI-compatible HTTP" in text:
                break
            assert time.monotonic() < end and self.proc.poll() is None, f"not serving: {self.err.read_text()[-2000:]}"
            time.sleep(0.1)
        grpc_port = next(line for line in text.splitlines() if "serving" in line).rsplit(":", 1)[1]
        http_port = next(line for line in text.splitlines() if "HTTP on" in line).rsplit(":", 1)[1].split("/")[0]
        return {"grpc": int(grpc_port), "http": int(http_port)}

    def stop(self) -> tuple[str, str]:
        """Wait up to a minute for it to exit by itself, then stop it; (stdout, stderr)."""
        try:
            self.proc.wait(WAIT_S * 2)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out.read_text(), self.err.read_text()


def held_port() -> socket.socket:
    """A listening socket as a gRPC server holds its port: SO_REUSEPORT set."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("flag, name", [("--port", "gRPC"), ("--http-port", "HTTP"), ("--metrics-port", "metrics")])
def test_a_port_in_use_is_one_line_and_a_failed_exit(tmp_path, tiny_model_dir, flag, name):
    with held_port() as holder:
        port = holder.getsockname()[1]
        flags = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        server = PythonServer(tmp_path, tiny_model_dir.parent, *[x for kv in flags.items() for x in kv])
        out, err = server.stop()
    assert "serving" not in out, f"a second server started on a port in use:\n{out}"
    assert server.proc.returncode not in (0, None) and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"lorafleet-server: cannot bind the {name} port "
                                            f"127.0.0.1:{port}: Address already in use")


def test_the_soft_fd_limit_is_raised_to_the_hard_one():
    code = "from server.net import raise_fd_limit; print(raise_fd_limit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S,
                         env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'proto'}"},
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)))
    assert out.stdout.strip() == "1024", out.stderr


def test_fd_exhaustion_refuses_new_connections_quietly(tmp_path, tiny_model_dir):
    """With 512 file descriptors (soft = hard, so nothing to raise) the HTTP door takes 128
    connections; 400 more are refused with 503, while gRPC calls, uploads included, still work
    and the log holds a line or two, not a traceback per accept."""
    adapter, _ = make_adapter(tiny_model_dir, tmp_path / "peft", "lora", 3)
    server = PythonServer(tmp_path, tiny_model_dir.parent, "--port", "0", "--http-port", "0", "--metrics-port", "-1",
                          "--http-header-timeout-s", "300", nofile=(512, 512))
    socks: list[socket.socket] = []
    try:
        ports = server.ports()
        socks = [connect(ports["http"]) for _ in range(528)]
        refused = wait_for_refusals(socks, 400)
        assert refused == 400 and len(socks) - refused == 128, refused
        with LoraFleetClient(f"127.0.0.1:{ports['grpc']}", timeout=WAIT_S) as c:
            assert c.upload_adapter(adapter, "during-flood").version == 1
            assert c.generate("hi", adapter="during-flood", max_new_tokens=2).completion_tokens >= 1
    finally:
        for s in socks:
            s.close()
        server.proc.terminate()
        out, err = server.stop()
    assert "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if "WARNING" in line or "ERROR" in line]) <= 3, err[-3000:]


def wait_for_refusals(socks: list[socket.socket], want: int) -> int:
    """How many of `socks` the server answered 503 and closed, waiting (with a deadline) for `want`."""
    refused, sel = 0, selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    end = time.monotonic() + WAIT_S
    while refused < want and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            sel.unregister(key.fileobj)
            refused += key.fileobj.recv(64).startswith(b"HTTP/1.1 503")
    time.sleep(1.0)          # then anything more that is refused counts too (and fails the test)
    refused += sum(key.fileobj.recv(64).startswith(b"HTTP/1.1 503") for key, _ in sel.select(timeout=0))
    sel.close()
    return refused


# ---------------------------------------------------------------- finding 10: deadline noise
class _EndedCall:
    """A servicer context whose call gRPC has already ended: sending its status fails."""

    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining

    async def abort_with_status(self, status) -> None:
        raise ExecuteBatchError("Failed \"execute_batch\"")


def test_a_status_for_a_call_its_deadline_ended_is_dropped_quietly(caplog):
    """The engine ends a call at its deadline while gRPC ends it too: no ExecuteBatchError
    reaches gRPC's logger (the handler ends as a cancelled call, which gRPC logs at debug)."""
    err = errors.DeadlineExceeded("the request's deadline passed")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(common.abort(_EndedCall(-0.01), "Generate", err))
    with pytest.raises(asyncio.CancelledError):           # any error, once the deadline has passed
        asyncio.run(common.abort(_EndedCall(-0.01), "Generate", errors.InvalidArgument("x")))
    with pytest.raises(ExecuteBatchError):                # a failure with time left is not muted
        asyncio.run(common.abort(_EndedCall(5.0), "Generate", errors.InvalidArgument("x")))
    assert not no_errors_logged(caplog)
