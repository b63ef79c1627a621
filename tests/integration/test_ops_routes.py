"""The HTTP door's operational routes (server/http/ops.py) against real servers on 127.0.0.1 port 0:
/health tells the truth gRPC health tells (503 while draining, while the engine is down), /metrics
needs the key --http-metrics says, /tokenize and /detokenize equal the tokenizer and the chat
template, and hostile inputs are 400s naming the field."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import LoraFleetClient
from server import metrics, version
from server.api.auth import create_key
from server.engine.scheduler import Scheduler
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.integration.test_openai_http import raw as http, wait_until
from tests.serving_fixtures import make_adapter

MODEL = "tiny-chat"
WAIT_S = 30.0
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ☃ <s>there"}]


@pytest.fixture(scope="module")
def chat_loaded(chat_model_dir):
    return load_model(chat_model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def door(chat_model_dir, chat_loaded, tmp_path_factory):
    """(running server, {tenant: key}, loaded model); acme owns 'mine', beta owns 'theirs'; ops is admin."""
    root = tmp_path_factory.mktemp("ops")
    keys_file = root / "keys.json"
    keys = {t: create_key(keys_file, t, t == "ops") for t in ("acme", "beta", "ops")}
    cfg = make_config(root, api_keys=keys_file, http_port=0, max_context_tokens=256, max_prompt_tokens=200,
                      max_new_tokens=200, adapter_slots=4)
    with BackgroundServer(cfg, chat_loaded) as running:
        for tenant, name, seed in (("acme", "mine", 1), ("beta", "theirs", 2)):
            d, _ = make_adapter(chat_model_dir, root / "peft", "lora", seed)
            with LoraFleetClient(f"127.0.0.1:{running.port}", api_key=keys[tenant], timeout=60) as c:
                c.upload_adapter(d, name)
        yield running, keys, chat_loaded


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


# ---------------------------------------------------------------- open routes
def test_health_and_version_need_no_key(door):
    running, _, _ = door
    with http(running) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.content == b""
        assert c.head("/health").status_code == 200
        assert c.get("/version").json() == {"version": version()}
        assert error(c.post("/tokenize", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
        assert error(c.post("/detokenize", json={"tokens": [1]}), 401)["code"] == "invalid_api_key"
        assert c.post("/health").status_code == 405


# ---------------------------------------------------------------- tokenize / detokenize
@pytest.mark.parametrize("prompt", ["hello world", "héllo ☃ </s> <s>", " leading and trailing "])
@pytest.mark.parametrize("special", [True, False])
def test_tokenize_equals_the_tokenizer_and_detokenize_inverts_it(door, prompt, special):
    running, keys, loaded = door
    tok = loaded.tokenizer
    with http(running, keys["acme"]) as c:
        r = c.post("/tokenize", json={"model": MODEL, "prompt": prompt, "add_special_tokens": special})
        assert r.status_code == 200, r.text
        want = tok.encode(prompt, add_special_tokens=special).ids
        assert r.json() == {"count": len(want), "max_model_len": 256, "tokens": want, "token_strs": None}
        back = c.post("/detokenize", json={"model": MODEL, "tokens": want}).json()
        assert back == {"prompt": tok.decode(want, skip_special_tokens=False)}
        if not special:
            assert back["prompt"] == prompt           # byte-level tokenizer: lossless
        strs = c.post("/tokenize", json={"prompt": prompt, "return_token_strs": True}).json()["token_strs"]
        assert strs == [tok.id_to_token(i) for i in tok.encode(prompt).ids]


def test_tokenize_messages_equals_the_chat_template_and_the_chat_prompt(door):
    running, keys, loaded = door
    with http(running, keys["acme"]) as c:
        r = c.post("/tokenize", json={"model": "mine", "messages": MSGS})
        assert r.status_code == 200, r.text
        want = loaded.chat.encode([(m["role"], m["content"]) for m in MSGS], loaded.tokenizer)
        assert r.json()["tokens"] == want and r.json()["count"] == len(want)
        # the "<s>" typed in content is text, not the special token
        assert want.count(loaded.tokenizer.token_to_id("<s>")) == 3       # the template's own turns only
        parts = [{"role": "user", "content": [{"type": "text", "text": "héllo ☃ "},
                                              {"type": "text", "text": "<s>there"}]}]
        assert c.post("/tokenize", json={"messages": parts}).json()["tokens"] == \
            loaded.chat.encode([("user", "héllo ☃ <s>there")], loaded.tokenizer)
        chat = c.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 1})
        assert chat.json()["usage"]["prompt_tokens"] == len(want)


def test_tokenize_model_is_one_the_caller_may_use(door):
    running, keys, _ = door
    with http(running, keys["acme"]) as c:
        for model in (MODEL, "mine", None):
            body = {"prompt": "x"} if model is None else {"model": model, "prompt": "x"}
            assert c.post("/tokenize", json=body).status_code == 200
        theirs = error(c.post("/tokenize", json={"model": "theirs", "prompt": "x"}), 404)
        missing = error(c.post("/tokenize", json={"model": "nobody-has-it", "prompt": "x"}), 404)
        assert theirs["code"] == missing["code"] == "model_not_found"
        assert error(c.post("/detokenize", json={"model": "theirs", "tokens": [1]}), 404)["code"] == "model_not_found"


HOSTILE = [
    # (route, raw JSON body, the field the 400 names, words in the message)
    ("/detokenize", json.dumps({"tokens": list(range(257))}), "tokens", "at most 256"),
    ("/detokenize", json.dumps({"tokens": [1, 259]}), "tokens[1]", "0 to 258"),
    ("/detokenize", json.dumps({"tokens": [-1]}), "tokens[0]", "not a token id"),
    ("/detokenize", json.dumps({"tokens": [10 ** 30]}), "tokens[0]", "not a token id"),
    ("/detokenize", json.dumps({"tokens": [1, True]}), "tokens[1]", "integer"),
    ("/detokenize", json.dumps({"tokens": [1.5]}), "tokens[0]", "integer"),
    ("/detokenize", json.dumps({"tokens": "1 2 3"}), "tokens", "list"),
    ("/detokenize", json.dumps({"tokens": [1], "skip_special_tokens": True}), "skip_special_tokens", "unknown field"),
    ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt", "lone surrogate"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content", "lone surrogate"),
    ("/tokenize", '{"model": "\\ud800", "prompt": "x"}', "model", "lone surrogate"),
    ("/tokenize", json.dumps({"prompt": "x" * (200 * 64 + 1)}), "prompt", "characters"),
    ("/tokenize", json.dumps({"prompt": 123}), "prompt", "string"),
    ("/tokenize", json.dumps({"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}),
     "add_special_tokens", "not supported"),
    ("/tokenize", json.dumps({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False}),
     "add_generation_prompt", "not supported"),
    ("/tokenize", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role", "roles"),
    ("/tokenize", json.dumps({"messages": [{"role": "user", "content": "x"}] * 65}), "messages", "at most 64"),
    ("/tokenize", json.dumps({"messages": []}), "messages", "at least 1"),
    ("/tokenize", json.dumps({"prompt": "x", "chat_template": "{{ 7*7 }}"}), "chat_template", "unknown field"),
    ("/tokenize", json.dumps(["prompt"]), "body", "JSON object"),
    ("/tokenize", "{" * 100, "body", "nests"),
    ("/tokenize", json.dumps({"prompt": "x", "extra": [0] * 9000}), "extra", "--max-json-items"),
]


@pytest.mark.parametrize("route,body,param,words", HOSTILE, ids=[f"{r}-{p}-{i}" for i, (r, _, p, _) in
                                                                  enumerate(HOSTILE)])
def test_hostile_inputs_are_400_naming_the_field(door, route, body, param, words):
    running, keys, _ = door
    with http(running, keys["acme"]) as c:
        err = error(c.post(route, content=body, headers={"Content-Type": "application/json"}), 400)
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error" and len(err["message"]) < 600


def test_calls_are_counted(door):
    running, keys, _ = door
    def count(method: str, code: str) -> float:
        return metrics.REGISTRY.get_sample_value("lorafleet_requests_total",
                                                 {"method": method, "code": code, "protocol": "http"}) or 0.0
    ok, bad = count("Tokenize", "OK"), count("Detokenize", "INVALID_ARGUMENT")
    with http(running, keys["acme"]) as c:
        c.post("/tokenize", json={"prompt": "x"})
        c.post("/detokenize", json={"tokens": [-1]})
        c.get("/health")
    assert count("Tokenize", "OK") == ok + 1 and count("Detokenize", "INVALID_ARGUMENT") == bad + 1


# ---------------------------------------------------------------- /metrics and its key
def test_metrics_on_the_http_port_need_an_admin_key(door):
    running, keys, _ = door
    with http(running) as c:
        assert error(c.get("/metrics"), 401)["code"] == "invalid_api_key"
    with http(running, keys["acme"]) as c:
        assert "admin key" in error(c.get("/metrics"), 403)["message"]
    with http(running, keys["ops"]) as c:
        c.post("/v1/completions", json={"model": MODEL, "prompt": "scrape", "max_tokens": 3, "temperature": 0})
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"lorafleet_requests", "lorafleet_inter_token_latency_seconds", "vllm:time_to_first_token_seconds",
                "vllm:request_success", "vllm:lora_requests_info", "lorafleet_server_info"} <= names
        assert f'model_name="{MODEL}"' in r.text
        # the same registry as the metrics port
        port = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics").text
        assert {f.name for f in text_string_to_metric_families(port)} == names
        om = c.get("/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        samples = [line.split("{")[0] for line in om.text.splitlines() if line and not line.startswith("#")]
        assert "vllm:time_to_first_token_seconds_count" in samples
        assert not [s for s in samples if s.startswith("vllm_")], "OpenMetrics lost the colons"


@pytest.mark.parametrize("mode,status", [("open", 200), ("off", 404)])
def test_metrics_open_or_off(tiny_loaded, tmp_path, mode, status):
    keys_file = tmp_path / "keys.json"
    key = create_key(keys_file, "acme", False)
    cfg = make_config(tmp_path, api_keys=keys_file, http_port=0, http_metrics=mode, adapter_slots=4)
    with BackgroundServer(cfg, tiny_loaded) as running, http(running) as c:
        r = c.get("/metrics")
        assert r.status_code == status, r.text
        if status == 200:
            assert "vllm:num_requests_running" in r.text
        else:
            assert r.json()["error"]["type"] == "not_found_error"
        assert c.get("/health").status_code == 200
        with http(running, key) as k:
            assert k.post("/tokenize", json={"prompt": "x"}).status_code == 200


def test_lora_requests_info_names_the_running_adapter(door, monkeypatch):
    running, keys, _ = door
    monkeypatch.setattr(metrics, "LORA_INFO_INTERVAL_S", 0.0)
    sched = running.engine.scheduler
    slow = threading.Event()
    real = sched.schedule

    def paced():                                 # the engine steps slowly while the test looks
        slow.wait(0.02)
        return real()
    monkeypatch.setattr(sched, "schedule", paced)

    def lora_info() -> dict[str, str]:
        with http(running, keys["ops"]) as c:
            text = c.get("/metrics").text
        fam = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info")
        assert len(fam.samples) == 1, fam.samples            # one live series
        return fam.samples[0].labels

    body = {"model": "mine", "prompt": "go on", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with http(running, keys["acme"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        wait_until(lambda: lora_info().get("running_lora_adapters") == "other/mine@1", "lora info to show mine")
        assert lora_info()["max_lora"] == "4"   # --adapter-slots (metrics are per process: every server here has 4)
    wait_until(lambda: lora_info().get("running_lora_adapters", "") == "", "lora info to empty")


# ---------------------------------------------------------------- health: draining, engine down
def test_health_is_503_while_draining_and_calls_in_flight_finish(tiny_loaded, tmp_path):
    cfg = make_config(tmp_path, http_port=0)
    bg = BackgroundServer(cfg, tiny_loaded)
    running = bg.__enter__()
    gate, entered = threading.Event(), threading.Event()
    try:
        sched = running.engine.scheduler
        real = sched.schedule

        def gated():                             # hold the first step until the test lets it go
            work = real()
            if work:
                entered.set()
                gate.wait(WAIT_S)
            return work
        sched.schedule = gated
        body = {"model": tiny_loaded.name, "prompt": "in flight", "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}
        with http(running) as c, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(c.post, "/v1/completions", json=body)
            assert entered.wait(WAIT_S)
            assert c.get("/health").status_code == 200
            stopping = asyncio.run_coroutine_threadsafe(running.shutdown(WAIT_S), bg.loop)
            with http(running) as probe:
                wait_until(lambda: probe.get("/health").status_code == 503, "/health to say 503")
                r = probe.get("/health")
                assert "shutting down" in error(r, 503)["message"] and r.headers["retry-after"] == "1"
                late = probe.post("/v1/completions", json=body)
                assert error(late, 503)["type"] == "service_unavailable_error"
                # the gRPC port has closed (no call in flight there), and well after uvicorn would have
                # seen an exit request (it looks every 0.1 s) the HTTP door still answers
                wait_until(lambda: _grpc_refused(running.port), "the gRPC port to close")
                time.sleep(0.5)
                assert error(probe.get("/health"), 503)["message"] and not in_flight.done()
            gate.set()
            done = in_flight.result(WAIT_S)
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
            stopping.result(WAIT_S)
    finally:
        gate.set()
        bg.__exit__(None, None, None)


def _grpc_refused(port: int) -> bool:
    try:
        _grpc_health(port)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def _grpc_health(port: int):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_health_follows_an_engine_restart_and_is_503_once_it_stays_down(tiny_loaded, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, http_port=0)
    with BackgroundServer(cfg, tiny_loaded) as srv, http(srv) as c, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=30) as g:
        assert c.get("/health").status_code == 200
        real = Scheduler.schedule
        calls = {"n": 0}

        def once(self):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("a bug in the scheduler")
            return real(self)
        monkeypatch.setattr(Scheduler, "schedule", once)
        with pytest.raises(grpc.RpcError):
            g.generate("crash", max_new_tokens=8, ignore_eos=True)
        wait_until(lambda: srv.engine.restarts == 1 and c.get("/health").status_code == 200,
                   "the engine to restart and /health to say 200")
        assert _grpc_health(srv.port) == health_pb2.HealthCheckResponse.SERVING

        def boom(self):
            raise RuntimeError("a bug in the scheduler")
        monkeypatch.setattr(Scheduler, "schedule", boom)
        deadline = time.monotonic() + WAIT_S
        while srv.engine.alive and time.monotonic() < deadline:
            with pytest.raises(grpc.RpcError):
                g.generate("crash", max_new_tokens=2)
        assert not srv.engine.alive
        wait_until(lambda: c.get("/health").status_code == 503, "/health to say 503")
        assert "restart" in error(c.get("/health"), 503)["message"]
        wait_until(lambda: _grpc_health(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   "gRPC health to say NOT_SERVING")
