"""The OpenAI-compatible HTTP door, with the official `openai` SDK as the client, against a real
server on 127.0.0.1 (gRPC and HTTP both on port 0) serving the tiny model with a chat template:
answers equal gRPC's for the same greedy request, tenants see and use only their own and shared
adapters, errors keep OpenAI's shape and our codes, and a client that goes away frees its slot."""
from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
import torch
from prometheus_client import REGISTRY

from client import LoraFleetClient
from server.api.auth import create_key
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.integration.test_tls import pki  # noqa: F401 - the certificates fixture
from tests.serving_fixtures import make_adapter

MODEL = "tiny-chat"             # the base model's name: its directory's name
WAIT_S = 30.0
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def door(chat_model_dir, tmp_path_factory):
    """(running server, {tenant: key}); acme owns 'mine', beta owns 'theirs', ops shares 'common'."""
    root = tmp_path_factory.mktemp("openai")
    keys_file = root / "keys.json"
    keys = {t: create_key(keys_file, t, t == "ops") for t in ("acme", "beta", "ops", "zero")}
    doc = json.loads(keys_file.read_text())
    for e in doc["keys"]:
        if e["tenant"] == "zero":
            e["quotas"] = {"max_concurrent_requests": 0}
    keys_file.write_text(json.dumps(doc))
    cfg = make_config(root, api_keys=keys_file, http_port=0, max_context_tokens=1024, max_new_tokens=900,
                      max_prompt_tokens=200, max_message_bytes=1 << 20)
    loaded = load_model(chat_model_dir, torch.device("cpu"), torch.float32)
    adapters = root / "peft"
    with BackgroundServer(cfg, loaded) as running:
        for tenant, name, seed, shared in (("acme", "mine", 1, False), ("beta", "theirs", 2, False),
                                           ("ops", "common", 3, True)):
            d, _ = make_adapter(chat_model_dir, adapters, "lora", seed)
            with grpc_client(running, keys[tenant]) as c:
                c.upload_adapter(d, name, shared=shared)
        yield running, keys


def grpc_client(running, key: str) -> LoraFleetClient:
    return LoraFleetClient(f"127.0.0.1:{running.port}", api_key=key, timeout=60)


def sdk(running, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key=key, max_retries=0,
                         timeout=60)


def raw(running, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{running.http_port}", headers=headers, timeout=60)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"waited {WAIT_S:g}s for {what}"
        time.sleep(0.01)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- models
def test_models_list_shows_the_base_and_only_the_callers_adapters(door):
    running, keys = door
    for tenant, own in (("acme", "mine"), ("beta", "theirs")):
        models = sdk(running, keys[tenant]).models.list()
        assert [m.id for m in models.data] == [MODEL, own, "shared/common"]
        assert {m.owned_by for m in models.data} == {"lorafleet", tenant, "shared"}
    assert sdk(running, keys["acme"]).models.retrieve("mine").id == "mine"
    with pytest.raises(openai.NotFoundError):
        sdk(running, keys["acme"]).models.retrieve("theirs")


# ---------------------------------------------------------------- same answers as gRPC
@pytest.mark.parametrize("model", [MODEL, "mine", "mine@1", "shared/common"])
def test_completions_equal_grpc_greedy(door, model):
    running, keys = door
    adapter = "" if model == MODEL else model
    with grpc_client(running, keys["acme"]) as c:
        want = c.generate("the quick brown fox", adapter=adapter, max_new_tokens=12, ignore_eos=True)
    api = sdk(running, keys["acme"])
    got = api.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert got.usage.total_tokens == want.prompt_tokens + 12 and got.model == model
    chunks = list(api.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("model", [MODEL, "mine"])
def test_chat_equals_grpc_greedy(door, model):
    running, keys = door
    adapter = "" if model == MODEL else model
    with grpc_client(running, keys["acme"]) as c:
        want = c.chat(MSGS, adapter=adapter, max_new_tokens=16)
    api = sdk(running, keys["acme"])
    got = api.chat.completions.create(model=model, messages=MSGS, max_tokens=16, temperature=0)
    msg = got.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == want.text
    assert msg.finish_reason == ("length" if want.completion_tokens == 16 else "stop")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    stream = api.chat.completions.create(model=model, messages=MSGS, max_completion_tokens=16, temperature=0,
                                         stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == msg.finish_reason and chunks[-1].usage is None


def test_an_adapter_changes_the_chat_reply_and_sampling_is_seeded(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    ask = dict(messages=[{"role": "user", "content": [{"type": "text", "text": "what is two plus two"}]}],
               max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    base = api.chat.completions.create(model=MODEL, **ask).choices[0].message.content
    tuned = api.chat.completions.create(model="mine", **ask).choices[0].message.content
    assert base != tuned
    seeded = dict(ask, temperature=1.0, top_p=0.9, seed=1234, stop=["\u0000\u0000"])
    a, b = (api.chat.completions.create(model="mine", **seeded).choices[0].message.content for _ in range(2))
    assert a == b


# ---------------------------------------------------------------- tenancy, auth, quotas
def test_another_tenants_adapter_is_the_same_404_as_a_missing_one(door):
    running, keys = door
    api = sdk(running, keys["beta"])
    errors = []
    for name in ("mine", "nobody-has-this"):
        with pytest.raises(openai.NotFoundError) as e:
            api.chat.completions.create(model=name, messages=MSGS, max_tokens=2)
        errors.append(e.value)
    e1, e2 = errors
    assert e1.status_code == e2.status_code == 404
    assert e1.body["message"].replace("mine", "X") == e2.body["message"].replace("nobody-has-this", "X")
    assert e1.code == e2.code == "model_not_found" and e1.type == e2.type == "not_found_error"
    with pytest.raises(openai.NotFoundError):       # not even a valid adapter name: still a 404
        api.completions.create(model="GPT-4o", prompt="hi", max_tokens=2)


def test_keys_are_required(door):
    running, _ = door
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(running, "lf_not-a-key").models.list()
    assert e.value.status_code == 401 and e.value.body["message"] == "invalid API key"
    r = raw(running).post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "missing API key" in r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"


def test_quota_is_429_with_the_quota_named(door):
    running, keys = door
    with pytest.raises(openai.RateLimitError) as e:
        sdk(running, keys["zero"]).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 429 and e.value.code == "max_concurrent_requests"
    assert "max_concurrent_requests=0" in e.value.body["message"]
    assert e.value.response.headers["retry-after"] == "1"


# ---------------------------------------------------------------- hostile bodies
@pytest.mark.parametrize("body, status, param, words", [
    (b'{"model": "tiny-chat", "prompt": ', 400, "body", "not valid JSON"),
    (b'["a list"]', 400, "body", "JSON object"),
    (b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens", "valid integer"),
    (b'{"model": "tiny-chat", "prompt": "hi", "temperature": "hot"}', 400, "temperature", "valid number"),
    (b'{"model": "tiny-chat", "prompt": 42}', 400, "prompt", "valid string"),
    (b'{"model": "tiny-chat", "prompt": "hi", "stop": [1]}', 400, "stop[0]", "valid string"),
    (b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 5000}', 400, "max_tokens", "limit of 900"),
    (b'{"model": "tiny-chat", "prompt": "hi", "top_k": 200000}', 400, "top_k", "top_k=200000 is out of range"),
    (b'{"model": "tiny-chat", "prompt": "hi", "repetition_penalty": 11}', 400, "repetition_penalty",
     "repetition_penalty=11.0 is out of range"),
    (b'{"model": "tiny-chat", "prompt": ""}', 400, "prompt", "prompt is empty"),
    (b'{"model": "tiny-chat", "prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i"]}', 400, "stop",
     "at most 8"),
    (b'{"model": "tiny-chat", "prompt": "hi", "n": 17}', 400, "n", "n=17 is out of range [1, 16]"),
    (b'{"model": "tiny-chat", "prompt": "hi", "n": 0}', 400, "n", "greater than or equal to 1"),
    (b'{"model": "tiny-chat", "prompt": "hi", "frequency_penalty": 2.5}', 400, "frequency_penalty",
     "frequency_penalty=2.5 is out of range [-2.0, 2.0]"),
    (b'{"model": "tiny-chat", "prompt": "hi", "best_of": 3}', 400, "best_of", "not supported"),
    (b'{"model": "tiny-chat", "prompt": "hi", "echo": true}', 400, "echo", "not supported"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logprobs": 21}', 400, "logprobs", "logprobs=21 is out of range [0, 20]"),
    (b'{"model": "tiny-chat", "prompt": "hi", "min_tokens": 40, "max_tokens": 8}', 400, "min_tokens",
     "min_tokens=40 is out of range [0, 8]"),
    (b'{"model": "tiny-chat", "prompt": "hi", "min_p": 1.5}', 400, "min_p", "min_p=1.5 is out of range"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"x1": 5}}', 400, "logit_bias", "not a token id"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"-1": 5}}', 400, "logit_bias", "not a token id"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"259": 5}}', 400, "logit_bias",
     "259 is not a token id of this model (0..258)"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"5": 101}}', 400, "logit_bias", "out of range [-100, 100]"),
    (b'{"model": "tiny-chat", "prompt": [], "max_tokens": 2}', 400, "prompt", "empty list"),
    (b'{"model": "tiny-chat", "prompt": ["a", ""], "max_tokens": 2}', 400, "prompt[1]", "prompt[1] is empty"),
    (b'{"model": "tiny-chat", "prompt": ["a", "b", "c", "d", "e"], "n": 16}', 400, "prompt",
     "at most 64 sequences"),
    (b'{"model": "tiny-chat", "prompt": "hi", "n": 2, "max_tokens": 2}', 200, None, ""),
    (b'{"model": "tiny-chat", "prompt": "hi", "seed": 0, "presence_penalty": -2, "frequency_penalty": 2,'
     b' "min_p": 1, "min_tokens": 2, "logit_bias": {"0": -100, "258": 100}, "logprobs": 20}', 200, None, ""),
    (b'{"model": "tiny-chat", "prompt": "hi", "tools": []}', 400, "tools", "unknown field"),
    (b'{"model": "tiny-chat", "prompt": "hi"}', 200, None, ""),
    (b'{"model": "tiny-chat", "prompt": "hi", "user": "u-1", "n": 1, "logprobs": null}', 200, None, ""),
])
def test_bad_completions_bodies_are_400_with_a_message(door, body, status, param, words):
    running, keys = door
    r = raw(running, keys["acme"]).post("/v1/completions", content=body,
                                        headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("messages, param, words", [
    ("hello", "messages", "valid list"),
    ([], "messages", "at least 1"),
    ([{"role": "user"}], "messages[0].content", "required"),
    ([{"role": "user", "content": "hi", "audio": "bob"}], "messages[0].audio", "unknown field"),
    ([{"role": "function", "content": "hi"}], "messages[0].role", "chat roles"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type", "'text'"),
])
def test_bad_chat_messages_are_400_naming_the_field(door, messages, param, words):
    running, keys = door
    with pytest.raises(openai.BadRequestError) as e:
        sdk(running, keys["acme"]).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert e.value.status_code == 400 and e.value.param == param and words in e.value.body["message"]


def test_huge_bodies_are_413_before_parsing(door):
    running, keys = door
    big = b'{"model": "tiny-chat", "prompt": "' + b"x" * (2 << 20) + b'"}'
    with raw(running, keys["acme"]) as c:
        declared = c.post("/v1/completions", content=big)
        chunked = c.post("/v1/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "bytes" in err["message"], err
    assert "content-length" not in {k.lower() for k in chunked.request.headers}


def test_unknown_paths_and_methods_keep_the_error_shape(door):
    running, keys = door
    with raw(running, keys["acme"]) as c:
        assert c.get("/v1/embeddings").json()["error"]["type"] == "not_found_error"
        assert c.get("/v1/completions").status_code == 405


# ---------------------------------------------------------------- client gone
def test_a_client_that_disconnects_mid_stream_frees_its_slot(door):
    running, keys = door
    sched = running.engine.scheduler
    cancelled = counter("lorafleet_finished_requests_total", reason="cancelled")
    body = {"model": "mine", "prompt": "go on forever", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with raw(running, keys["acme"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert next(line for line in lines if line.startswith("data:"))     # tokens are flowing
        assert len(sched.running) == 1
    # the connection is closed: the engine cancels the sequence well before its 900 tokens
    wait_until(lambda: not sched.running and not sched.waiting, "the engine slot to be freed")
    wait_until(lambda: counter("lorafleet_finished_requests_total", reason="cancelled") == cancelled + 1,
               "the sequence to finish as cancelled")
    assert counter("lorafleet_requests_total", method="Completions", code="CANCELLED", protocol="http") >= 1


def test_a_client_that_disconnects_while_waiting_frees_its_slot(door):
    running, keys = door
    sched = running.engine.scheduler
    cancelled = counter("lorafleet_finished_requests_total", reason="cancelled")
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 900, "temperature": 0,
                       "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['acme']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=WAIT_S) as s:
        s.sendall(head + body)
        wait_until(lambda: len(sched.running) == 1, "the request to be running")
    wait_until(lambda: not sched.running and not sched.waiting, "the engine slot to be freed")
    wait_until(lambda: counter("lorafleet_finished_requests_total", reason="cancelled") == cancelled + 1,
               "the sequence to finish as cancelled")


def test_requests_are_counted_by_protocol(door):
    running, keys = door
    before = counter("lorafleet_requests_total", method="Completions", code="OK", protocol="http")
    sdk(running, keys["acme"]).completions.create(model=MODEL, prompt="count me", max_tokens=2)
    assert counter("lorafleet_requests_total", method="Completions", code="OK", protocol="http") == before + 1
    grpc_before = counter("lorafleet_requests_total", method="Generate", code="OK", protocol="grpc")
    with grpc_client(running, keys["acme"]) as c:
        c.generate("count me", max_new_tokens=2)
    assert counter("lorafleet_requests_total", method="Generate", code="OK", protocol="grpc") == grpc_before + 1


# ---------------------------------------------------------------- TLS, as on the gRPC port
def test_the_door_serves_tls_and_mutual_tls_from_the_grpc_flags(tiny_loaded, tmp_path, pki):
    import ssl

    cfg = make_config(tmp_path, http_port=0, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_client_ca=pki / "ca.pem")
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with BackgroundServer(cfg, tiny_loaded) as running:
        url = f"https://127.0.0.1:{running.http_port}/v1/models"
        with pytest.raises(httpx.TransportError):            # no client certificate
            httpx.get(url, verify=trust, timeout=WAIT_S)
        with pytest.raises(httpx.TransportError):            # plain HTTP
            httpx.get(url.replace("https", "http"), timeout=WAIT_S)
        trust.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        r = httpx.get(url, verify=trust, timeout=WAIT_S)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == tiny_loaded.name


def test_chat_errors_name_openais_fields(door):
    """Issue 21: the HTTP door builds the domain request itself; validation names the field as the
    caller spelled it (max_completion_tokens, messages[1].role), never a proto path."""
    running, keys = door
    client = sdk(running, keys["acme"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=5000)
    assert e.value.param == "max_completion_tokens" and "max_completion_tokens=5000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"},
                                                                            {"role": "wizard", "content": "x"}])
    assert e.value.param == "messages[1].role" and "params." not in e.value.body["message"]


def test_grpc_errors_name_proto_fields_and_a_call_authenticates_once(door, monkeypatch):
    """The same checks over gRPC name the proto field (params.top_k, in a BadRequest detail); the
    interceptor authenticates each call once and the servicer reads that caller."""
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    from server.api.auth import Authenticator
    running, keys = door
    calls = []
    real = Authenticator.principal
    monkeypatch.setattr(Authenticator, "principal", lambda self, md: calls.append(1) or real(self, md))
    with grpc_client(running, keys["acme"]) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("hi", top_k=200_000)
        status = rpc_status.from_call(e.value)
        bad = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == "params.top_k" and "params.top_k=200000" in e.value.details()
        calls.clear()
        assert c.generate("hi", max_new_tokens=2).completion_tokens >= 1
        c.list_adapters()
        assert len(calls) == 2
