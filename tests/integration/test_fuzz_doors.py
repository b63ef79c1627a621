"""Issue 20: one request never hurts anyone else. Hypothesis over both doors of one server.

One server (the tiny model with a chat template; gRPC and the OpenAI-compatible HTTP door on
127.0.0.1 port 0; a keys file with tenants `fuzz` and `canary`). Every example sends 1-4 fuzzed
requests of tenant `fuzz` at once (OpenAI chat and completions bodies and gRPC GenerateRequests,
mixed; streamed, cancelled, under short deadlines) while tenant `canary` runs one greedy request
with its own adapter in the same batches. After every example:

  * no call hangs (each answers within its deadline)
  * the engine lives and gRPC health is SERVING
  * every HTTP answer is 200 or 4xx (a 200 stream ends in [DONE] or a client-error event), never 5xx
  * every gRPC status is OK or a client-error code, never INTERNAL / UNKNOWN / UNAVAILABLE
  * the canary answers OK with exactly the tokens it got alone (computed once, before the fuzzing)
  * no ERROR record or traceback reached the log

Values cover the whole accepted range, its edges and just past them (temperature 0, 1e-38, 1e-30,
2.0 / 100; top_p 1e-38..1; top_k 0..2^32-1; seeds 0..2^63-1 / 2^64-1 (or none); issue 23's presence
and frequency penalties -2..2, min_p 0..1, min_tokens 0..max, logit_bias of up to the limit's
entries with biases -100..100 (keys out of the vocabulary, not numbers, one too many), logprobs /
top_logprobs 0..20, n 1..16; ...), wrong types, nesting,
and text with lone surrogates (HTTP only: protobuf cannot carry them), NUL, RTL marks, emoji,
combining marks and chat-template control text (`<|im_end|>`, the tiny template's `<s>`/`</s>`).

An example that kills the engine restarts the server (same store), so hypothesis still shrinks to
the smallest request that does it. Each finding raises its own AssertionError subclass (the
property plus the exception type the server named), so distinct bugs shrink apart.

`test_edge` first sends the named extremes one by one; the hypothesis tests then explore their
combinations: HTTP bodies, gRPC requests, and both doors in one example.

Reproducible by default (derandomized, no example database); ~30 s when nothing fails. Shrinking
a finding that kills the engine takes minutes (a restart per try). Knobs:
    LORAFLEET_FUZZ_EXAMPLES=500   examples per hypothesis test (default 40)
    LORAFLEET_FUZZ_SEED=7         a different, still reproducible, sequence of examples
    LORAFLEET_FUZZ_SHRINK=0       report the first failing example as found, unshrunk
tests/integration/test_fuzz_api.py fuzzes the other RPCs (Classify, uploads, adapter queries).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from loadtest.traffic import lora_archive, upload_messages
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server.api.auth import create_key
from server.config import ServerConfig
from server.main import BackgroundServer
from server.model.loader import LoadedModel, load_model
from tests.integration.conftest import make_config

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")   # examples with 12 kB prompts
EXAMPLES = int(os.environ.get("LORAFLEET_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("LORAFLEET_FUZZ_SEED")
SHRINK = os.environ.get("LORAFLEET_FUZZ_SHRINK", "1") != "0"
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                    # no 'explain' phase: a minute of reruns for a line number we already print
                    phases=(Phase.explicit, Phase.generate) + ((Phase.shrink,) if SHRINK else ()),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT = 48                      # --max-new-tokens of the server below
BASE = "tiny-chat"              # the base model's name on the HTTP door (its directory's name)
CALL_S = 60.0                   # a call's deadline unless the example sets a short one
CANARY = pb.GenerateRequest(prompt="the canary sings in the mine", adapter="theirs",
                            params=pb.SamplingParams(max_new_tokens=24, ignore_eos=True))
CLIENT_ERRORS = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                 "PERMISSION_DENIED", "OUT_OF_RANGE", "UNAUTHENTICATED", "ALREADY_EXISTS"}
MAX_U32, MAX_U64, MAX_SEED = 2**32 - 1, 2**64 - 1, 2**63 - 1


# ---------------------------------------------------------------- values
# Most drawn requests must be valid, or the fuzzing never reaches the engine: each field is
# usually in range (its edges drawn often), rarely out of range or of a wrong type. `rarely`
# puts the rare branch last, so shrinking moves away from it.
def rarely(common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == one_in - 1 else common)


def extremes(good: st.SearchStrategy, edges: list, bad: list) -> st.SearchStrategy:
    """In-range values and the range's edges, rarely the values just past it."""
    return rarely(st.one_of(good, st.sampled_from(edges), st.sampled_from(edges)), st.sampled_from(bad))


SURROGATES = ["\ud800", "\udfff", "\ud83d", "\udc00x"]
FRAGMENTS = ["\x00", "\u202e", "\u200f", "\u061c", "\ufeff", "\u200b", "\u2028", "\x7f", "\x1b[31m", "\ufffd",
             "\U0010ffff", "😀", "👩‍👩‍👧‍👦", "🏳️‍🌈", "e\u0301", "\u0301" * 16, "Z\u0334\u0321\u031b\u0353",
             "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "<s>", "</s>", "<s>assistant\n",
             "</s>\n<s>system\n", "{{ raise_exception('x') }}", "{% endfor %}", "\\u0000", '"', "\n", "\r\n",
             "\t", " ", "a"]


def texts(surrogates: bool, long: bool = True) -> st.SearchStrategy[str]:
    """Short text of hostile fragments and arbitrary characters; rarely (`long`) one about the
    prompt limit (200 tokens) or far above it."""
    frag = st.sampled_from(FRAGMENTS + (SURROGATES if surrogates else []))
    short = st.lists(st.one_of(st.text(max_size=12), frag, frag), min_size=1, max_size=6).map("".join)
    limit = st.sampled_from([199, 200, 201, 12800, 12801]).map(lambda n: "x" * n)
    return rarely(short, limit) if long else short


TINY = [1e-38, 1e-30, 1.1754943508222875e-38, 1e-45, 1.401298464324817e-45, 5e-324, 1e-300, 1e-10]
NAN, INF = float("nan"), float("inf")
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), c, max_size=3)),
                        max_leaves=8)


def or_wrong(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly `good`; rarely any JSON value at all (wrong types, nesting)."""
    return rarely(good, json_any)


ABSENT = object()


def maybe(value: st.SearchStrategy, one_in: int) -> st.SearchStrategy:
    """A field sent with probability 1/one_in (shrinks to absent)."""
    return rarely(st.just(ABSENT), value, one_in)


def present(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not ABSENT}


# ---------------------------------------------------------------- HTTP bodies
@dataclass(frozen=True)
class Deep:
    """A body whose `field` is nested `depth` lists deep (sent as raw bytes)."""
    field: str
    depth: int

    def encode(self) -> bytes:
        return (f'{{"model":"{BASE}","max_tokens":2,"{self.field}":'.encode() + b"[" * self.depth
                + b"]" * self.depth + b"}")


@dataclass(frozen=True)
class HttpShot:
    path: str
    body: dict | bytes | Deep
    cancel: bool = False        # streamed: close the connection after the first event
    key: str = "fuzz"           # which key to send: fuzz, canary (its own tenant), bad, none

    def encode(self) -> bytes:
        if isinstance(self.body, Deep):
            return self.body.encode()
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body, ensure_ascii=True).encode()     # NaN/Infinity as Python writes them


ODD_MODELS = ["mine@2", "theirs", "theirs@1", "shared/none", "", "@", "mine@", "../../etc/passwd", "a" * 300,
              "TINY-CHAT", BASE + "@1"]
http_text, stop_text = texts(surrogates=True), texts(surrogates=True, long=False)
models = rarely(st.sampled_from([BASE, "mine", "mine@1"]), st.one_of(st.sampled_from(ODD_MODELS), http_text), 6)
SAMPLING = {    # sent half the time each
    "max_tokens": extremes(st.integers(1, LIMIT), [1, LIMIT], [0, -1, LIMIT + 1, MAX_U32, MAX_U32 + 1, 2**70]),
    "temperature": extremes(st.floats(0, 2), [0, 0.0, *TINY, 1.0, 2.0], [-0.0, -1e-38, 2.0000001, 1e308, NAN, INF]),
    "top_p": extremes(st.floats(1e-38, 1), [*TINY, 0.5, 1.0], [0, -1e-38, 1.0000001, NAN, -INF]),
    "top_k": extremes(st.integers(0, MAX_U32), [0, 1, 2, 100_000, 100_001, MAX_U32], [-1, MAX_U32 + 1]),
    "repetition_penalty": extremes(st.floats(1e-38, 10), [*TINY, 0.5, 1.0, 10.0, 1e38, 1e308], [0, -1.0, NAN, INF]),
    "seed": extremes(st.integers(0, MAX_SEED), [0, 1, MAX_SEED], [-1, MAX_SEED + 1, MAX_U64, MAX_U64 + 1]),
    "stop": rarely(st.one_of(st.lists(stop_text, max_size=3), stop_text), st.lists(http_text, max_size=10)),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}
VOCAB = 259                     # the tiny model's token ids: 0..258
MAX_LOGIT_BIAS = ServerConfig.max_logit_bias
penalty = extremes(st.floats(-2, 2), [-2.0, -2, 0, 0.0, 1e-38, 2, 2.0], [-2.0000001, 2.0000001, 1e308, NAN, INF])
bias_value = extremes(st.floats(-100, 100), [-100, -100.0, 0, 1e-38, 100, 100.0], [-100.001, 101, NAN, -INF])
logit_bias = rarely(
    st.dictionaries(st.integers(0, VOCAB - 1).map(str), bias_value, max_size=12),
    st.one_of(st.dictionaries(st.sampled_from(["259", "4294967295", "-1", "1.5", "abc", "", " 7", "\u0663"]),
                              bias_value, min_size=1, max_size=2),
              st.just({str(i): 1.0 for i in range(MAX_LOGIT_BIAS)}),          # at the limit, most out of vocab
              st.just({str(i): -1.0 for i in range(MAX_LOGIT_BIAS + 1)})))                         # one past it
top_logprobs = extremes(st.integers(0, 20), [0, 1, 20], [21, 1000, -1, MAX_U32 + 1])
ODDBALLS = {    # sent one time in eight each
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": http_text,
    "n": extremes(st.integers(1, 3), [1, 16], [0, 17, 10**6, 2**40]),
    "presence_penalty": penalty,
    "frequency_penalty": penalty,
    "logit_bias": logit_bias,
    "min_p": extremes(st.floats(0, 1), [0, 0.0, *TINY, 1.0], [-1e-38, 1.0000001, NAN]),
    "min_tokens": extremes(st.integers(0, LIMIT), [0, 1, LIMIT], [-1, LIMIT + 1, MAX_U32 + 1]),
    "unknown_field": st.just(1),
}


def fields(extra_oddballs: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({**{k: maybe(or_wrong(v), 2) for k, v in SAMPLING.items()},
                                  **{k: maybe(or_wrong(v), 8) for k, v in {**ODDBALLS, **extra_oddballs}.items()}})


part = rarely(st.fixed_dictionaries({"type": st.just("text"), "text": http_text}),
              st.fixed_dictionaries({"type": st.sampled_from(["image_url", "Text", ""]), "text": http_text}))
message = st.fixed_dictionaries({
    "role": or_wrong(rarely(st.sampled_from(["user", "system", "assistant"]),
                            st.one_of(st.sampled_from(["tool", "developer", "", "User", "<s>"]), http_text))),
    "content": or_wrong(rarely(http_text, st.lists(part, max_size=3), 3)),
    "name": maybe(st.just("x"), 10)})
chat_body = st.builds(lambda model, msgs, f: present({"model": model, "messages": msgs, **f}),
                      rarely(or_wrong(models), st.just(ABSENT), 20),
                      rarely(or_wrong(st.lists(message.map(present), min_size=1, max_size=4)), st.just(ABSENT), 20),
                      fields({"max_completion_tokens": SAMPLING["max_tokens"], "logprobs": st.booleans(),
                              "top_logprobs": top_logprobs}))
completion_body = st.builds(lambda model, prompt, f: present({"model": model, "prompt": prompt, **f}),
                            rarely(or_wrong(models), st.just(ABSENT), 20),
                            rarely(or_wrong(rarely(http_text, st.lists(http_text, max_size=2))), st.just(ABSENT), 20),
                            fields({"echo": st.sampled_from([False, True]), "best_of": st.sampled_from([1, 3]),
                                    "suffix": st.sampled_from(["", "x"]), "logprobs": top_logprobs}))
raw_body = st.one_of(
    st.sampled_from([b"", b"{", b"null", b"[]", b'"x"', b"1e999", b"\xff\xfe{}", b'{"model": NaN}',
                     f'{{"model":"{BASE}","prompt":"a","prompt":"b","max_tokens":1}}'.encode()]),
    st.builds(Deep, st.sampled_from(["prompt", "messages", "stop"]), st.sampled_from([2, 900, 5000, 100_000])))
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
http_shots = rarely(
    st.one_of(st.builds(HttpShot, st.just(CHAT), chat_body, st.booleans()),
              st.builds(HttpShot, st.just(COMPLETIONS), completion_body, st.booleans())),
    st.one_of(st.builds(HttpShot, st.sampled_from([CHAT, COMPLETIONS]), raw_body),
              st.builds(HttpShot, st.just(COMPLETIONS), completion_body, st.just(False),
                        st.sampled_from(["canary", "bad", "none"]))), 8)


# ---------------------------------------------------------------- gRPC requests
@dataclass(frozen=True)
class GrpcShot:
    request: pb.GenerateRequest
    stream: bool = False
    cancel: bool = False            # streamed: cancel after the first message
    deadline: float | None = None   # a short deadline (DEADLINE_EXCEEDED allowed)


grpc_text = texts(surrogates=False)
f32 = dict(width=32, allow_subnormal=True)
grpc_params = st.builds(
    pb.SamplingParams,
    max_new_tokens=extremes(st.integers(0, LIMIT), [0, 1, LIMIT], [LIMIT + 1, MAX_U32]),
    temperature=extremes(st.floats(0, 100, **f32), [0.0, *TINY, 1.0, 2.0, 100.0],
                         [-1e-38, 100.00001, 1e38, NAN, INF, -INF]),
    top_p=extremes(st.floats(0, 1, **f32), [0.0, *TINY, 0.5, 1.0], [-1e-38, 1.0000001, NAN]),
    top_k=extremes(st.integers(0, 100_000), [0, 1, 2, 100_000], [100_001, MAX_U32]),
    seed=st.one_of(st.none(), st.integers(0, MAX_U64), st.sampled_from([0, 1, MAX_SEED, MAX_U64])),   # None: unset
    stop=rarely(st.lists(texts(surrogates=False, long=False), max_size=3), st.lists(grpc_text, max_size=10)),
    repetition_penalty=extremes(st.floats(0, 10, **f32), [0.0, *TINY, 0.5, 1.0, 10.0], [10.000001, 1e38, NAN, INF]),
    ignore_eos=st.booleans(),
    presence_penalty=extremes(st.floats(-2, 2, **f32), [-2.0, 0.0, 2.0], [-2.0000002, 2.0000002, NAN, INF]),
    frequency_penalty=extremes(st.floats(-2, 2, **f32), [-2.0, 0.0, 2.0], [-2.0000002, 2.0000002, NAN, -INF]),
    min_p=extremes(st.floats(0, 1, **f32), [0.0, *TINY, 1.0], [-1e-38, 1.0000001, NAN]),
    min_tokens=extremes(st.integers(0, LIMIT), [0, LIMIT], [LIMIT + 1, MAX_U32]),
    logit_bias=rarely(st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100, **f32), max_size=12),
                      st.one_of(st.dictionaries(st.sampled_from([VOCAB, MAX_U32]), st.just(1.0), min_size=1),
                                st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([101.0, NAN, -INF]),
                                                min_size=1, max_size=2),
                                st.just({i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}))),
    logprobs=st.booleans(),
    top_logprobs=extremes(st.integers(0, 20), [0, 20], [21, 1000, MAX_U32]),
    n=extremes(st.integers(0, 3), [0, 1, 16], [17, 10**6, MAX_U32]))
chat_messages = st.lists(st.builds(pb.ChatMessage, role=rarely(st.sampled_from(["user", "system", "assistant"]),
                                                               st.one_of(st.sampled_from(["tool", "", "<s>"]),
                                                                         grpc_text)),
                                   content=grpc_text), min_size=1, max_size=4)
adapters = rarely(st.sampled_from(["", "mine", "mine@1"]), st.sampled_from([BASE, *ODD_MODELS]), 6)
grpc_requests = rarely(
    st.one_of(st.builds(pb.GenerateRequest, prompt=grpc_text, adapter=adapters, params=grpc_params,
                        request_id=rarely(st.just(""), grpc_text, 4)),
              st.builds(pb.GenerateRequest, messages=chat_messages, adapter=adapters, params=grpc_params)),
    st.builds(pb.GenerateRequest, prompt=grpc_text, messages=chat_messages, params=grpc_params), 20)
grpc_shots = st.builds(GrpcShot, grpc_requests, st.booleans(), st.booleans(),
                       rarely(st.none(), st.sampled_from([0.001, 0.05]), 6))


# ---------------------------------------------------------------- the server
class LogRecords(logging.Handler):
    """Every ERROR record and every record with a traceback, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


class Fleet:
    """One server and its clients; `restart()` after an example killed the engine."""

    def __init__(self, cfg: ServerConfig, loaded: LoadedModel, keys: dict[str, str], log: LogRecords):
        self.cfg, self.loaded, self.keys, self.log = cfg, loaded, keys, log
        self.solo: list[int] = []          # the canary's tokens, run alone

    def __repr__(self) -> str:             # hypothesis prints the fixture with each failing example
        return "fleet"

    def start(self) -> None:
        self.bg = BackgroundServer(self.cfg, self.loaded)
        self.running = self.bg.__enter__()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.running.http_port}", timeout=CALL_S)

    def stop(self) -> None:
        self.http.close()
        self.channel.close()
        self.bg.__exit__(None, None, None)

    def restart(self) -> None:
        self.stop()
        self.start()

    def md(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def health_status(self) -> str:
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as e:
            return e.code().name


@pytest.fixture(scope="module")
def fleet(chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-doors")
    keys_file = root / "keys.json"
    keys = {t: create_key(keys_file, t, False) for t in ("fuzz", "canary")}
    # no /metrics server: it takes 0.5 s to stop, and every example that kills the engine restarts the server
    cfg = make_config(root, api_keys=keys_file, http_port=0, metrics_port=-1, max_new_tokens=LIMIT,
                      max_context_tokens=256, max_prompt_tokens=200)
    loaded = load_model(chat_model_dir, torch.device("cpu"), torch.float32)
    log = LogRecords()
    logging.getLogger().addHandler(log)
    f = Fleet(cfg, loaded, keys, log)
    f.start()
    try:
        a = loaded.model.shape
        adapters = pb_grpc.AdaptersStub(f.channel)
        for tenant, name, s in (("fuzz", "mine", 1), ("canary", "theirs", 2)):
            archive = lora_archive(a.hidden_size, a.num_layers, rank=4, seed=s)
            adapters.UploadAdapter(upload_messages(name, archive), metadata=f.md(tenant), timeout=30)
        f.solo = list(f.inference.Generate(CANARY, metadata=f.md("canary"), timeout=CALL_S).token_ids)
        assert len(f.solo) == CANARY.params.max_new_tokens
        yield f
    finally:
        f.stop()
        logging.getLogger().removeHandler(log)


# ---------------------------------------------------------------- sending
@dataclass(frozen=True)
class Outcome:
    what: str                   # "HTTP 200", "HTTP 500", "OK", "INTERNAL", "no answer", ...
    bad: bool                   # a server error (5xx, INTERNAL, a cut stream, ...)
    detail: str = ""


def send_http(f: Fleet, shot: HttpShot) -> Outcome:
    headers = {"content-type": "application/json"}
    if shot.key in f.keys:
        headers["authorization"] = f"Bearer {f.keys[shot.key]}"
    elif shot.key == "bad":
        headers["authorization"] = "Bearer lf_not_a_key"
    with f.http.stream("POST", shot.path, content=shot.encode(), headers=headers) as r:
        if r.status_code >= 500:
            return Outcome(f"HTTP {r.status_code}", True, r.read().decode(errors="replace")[:300])
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
            body = r.read()
            if r.status_code == 200 and "choices" not in json.loads(body):
                return Outcome("HTTP 200", True, f"not a completion: {body[:200]!r}")
            return Outcome(f"HTTP {r.status_code}", False)
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return Outcome("HTTP 200 stream", False)
            doc = json.loads(data)
            if "error" in doc:
                err = doc["error"]
                return Outcome(f"HTTP 200 stream error {err.get('type')}", err.get("type") == "server_error",
                               err.get("message", ""))
            if shot.cancel:
                return Outcome("HTTP 200 stream (closed by the client)", False)
        return Outcome("HTTP 200 stream", True, "the stream ended without [DONE] or an error event")


def send_grpc(f: Fleet, shot: GrpcShot) -> Outcome:
    timeout, md = shot.deadline or CALL_S, f.md("fuzz")
    allowed = CLIENT_ERRORS | ({"DEADLINE_EXCEEDED"} if shot.deadline else set()) | \
        ({"CANCELLED"} if shot.cancel and shot.stream else set())
    try:
        if not shot.stream:
            f.inference.Generate(shot.request, timeout=timeout, metadata=md)
        else:
            call = f.inference.GenerateStream(shot.request, timeout=timeout, metadata=md)
            for _ in call:
                if shot.cancel:
                    call.cancel()
                    break
        return Outcome("OK", False)
    except grpc.RpcError as e:
        return Outcome(e.code().name, e.code().name not in allowed, e.details() or "")


def send_canary(f: Fleet) -> Outcome:
    try:
        got = list(f.inference.Generate(CANARY, metadata=f.md("canary"), timeout=CALL_S).token_ids)
    except grpc.RpcError as e:
        return Outcome(e.code().name, True, e.details() or "")
    return Outcome("OK", got != f.solo, f"got {got}" if got != f.solo else "")


def run_all(f: Fleet, calls: list) -> list[Outcome]:
    """Start every call at once (one thread each); an unanswered call is 'no answer'."""
    out = [Outcome("no answer", True, f"no answer within {CALL_S + 30:g}s")] * len(calls)
    start = threading.Barrier(len(calls))

    def one(i: int) -> None:
        try:
            start.wait(10)
            out[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - a transport failure is a finding too
            out[i] = Outcome(f"client saw {type(e).__name__}", True, str(e)[:300])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + CALL_S + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return out


# ---------------------------------------------------------------- findings
_FINDINGS: dict[str, type[AssertionError]] = {}


def finding(kind: str) -> type[AssertionError]:
    """An AssertionError subclass per kind of finding: hypothesis tells bugs apart by exception
    type and line, so 'HTTP 500 UnicodeEncodeError' and 'HTTP 500 RecursionError' shrink apart."""
    name = re.sub(r"\W+", "_", kind).strip("_")
    return _FINDINGS.setdefault(name, type(name, (AssertionError,), {}))


def server_named(detail: str) -> str:
    m = re.search(r"internal error \((\w+)\)|engine failed", detail)
    return (m.group(1) or "engine_failed") if m else ""


def check_example(f: Fleet, shots_: list, outcomes: list[Outcome], canary: Outcome, log_before: int) -> None:
    pairs = list(zip(shots_, outcomes))
    hung = [(s, o) for s, o in pairs if o.what == "no answer"] + ([("canary", canary)] if canary.what == "no answer"
                                                                  else [])
    if hung:
        raise finding("call_hung")(f"calls never answered: {hung}")
    health = f.health_status()
    if not f.running.engine.alive or health != "SERVING":
        crashed = f.running.engine.crashed
        f.restart()                         # for the next example (hypothesis goes on shrinking)
        raise finding(f"engine_died_{type(crashed).__name__}")(
            f"after this example the engine is dead ({crashed!r}) and health is {health}; answers: {pairs}")
    for s, o in pairs:
        if o.bad and isinstance(s, HttpShot):
            raise finding(f"http_{o.what}_{server_named(o.detail)}")(f"{o.what}: {o.detail} for {s}")
    for s, o in pairs:
        if o.bad and isinstance(s, GrpcShot):
            raise finding(f"grpc_{o.what}_{server_named(o.detail)}")(f"{o.what}: {o.detail} for {s}")
    if canary.bad:
        raise finding("canary_hurt")(f"the canary ({canary.what}) {canary.detail}, alone it got {f.solo}; "
                                     f"beside: {pairs}")
    new = f.log.records[log_before:]
    if new:
        r = new[0]
        exc = r.exc_info[0].__name__ if r.exc_info else ""
        raise finding(f"log_{r.levelname}_{exc}")(f"{len(new)} ERROR/traceback records, first: {r.name}: "
                                                  f"{r.getMessage()} {exc}; answers: {pairs}")


# ---------------------------------------------------------------- the tests
def run_example(f: Fleet, shots_: list) -> None:
    """Send `shots_` and the canary at once, then check every property."""
    log_before = len(f.log.records)
    calls = [(lambda s=s: send_http(f, s) if isinstance(s, HttpShot) else send_grpc(f, s)) for s in shots_]
    *outcomes, canary = run_all(f, [*calls, lambda: send_canary(f)])
    check_example(f, shots_, outcomes, canary, log_before)


def completion(stream: bool = False, **kw) -> HttpShot:
    return HttpShot("/v1/completions", {"model": BASE, "prompt": "hello", "max_tokens": 8, "stream": stream, **kw})


def chat(content="hello", role="user", **kw) -> HttpShot:
    return HttpShot("/v1/chat/completions", {"model": BASE, "max_tokens": 8,
                                             "messages": [{"role": role, "content": content}], **kw})


def generate(prompt: str = "hello", stream: bool = False, messages=(), **params) -> GrpcShot:
    p = pb.SamplingParams(max_new_tokens=8, **params)
    req = pb.GenerateRequest(messages=list(messages), params=p) if messages else pb.GenerateRequest(prompt=prompt,
                                                                                                    params=p)
    return GrpcShot(req, stream)


# The brief's edges one by one (each beside the canary): the accepted range's ends and the text that
# breaks encoders and chat templates. Hypothesis (below) explores their combinations.
EDGES = {
    **{f"http-temperature-{t:g}{'-stream' if s else ''}": completion(s, temperature=t, seed=1)
       for t in (0, 1e-38, 1e-30, 1e-45, 5e-324, 2.0) for s in (False, True)},
    "http-top_p-1e-38": completion(temperature=1.0, top_p=1e-38),
    "http-top_k-2^32-1": completion(temperature=1.0, top_k=MAX_U32),
    "http-top_k-100000": completion(temperature=1.0, top_k=100_000),
    "http-repetition_penalty-1e-38-greedy": completion(temperature=0, repetition_penalty=1e-38),
    "http-repetition_penalty-1e-38-sampled": completion(temperature=1.0, repetition_penalty=1e-38),
    "http-repetition_penalty-1e308": completion(repetition_penalty=1e308),
    "http-seed-2^63-1": completion(temperature=1.0, seed=MAX_SEED),
    "http-max_tokens-limit": completion(max_tokens=LIMIT, ignore_eos=True),
    "http-n-16-logprobs-20-stream": completion(True, n=16, logprobs=20, temperature=1.0, seed=MAX_SEED),
    "http-chat-n-16-top_logprobs-20": chat(n=16, logprobs=True, top_logprobs=20, temperature=2.0, min_p=1e-38),
    "http-prompt-list-of-4-n-16": completion(prompt=["a", "b", "c", "d"], n=16, max_tokens=2),
    "http-penalties-extremes": completion(temperature=1e-30, presence_penalty=2, frequency_penalty=-2, min_p=1,
                                          min_tokens=8, logit_bias={str(i): 100 for i in range(VOCAB)}),
    "http-logit-bias-100000": completion(logit_bias={str(i): 1 for i in range(100_000)}),
    "http-top_logprobs-1000": chat(logprobs=True, top_logprobs=1000),
    "http-developer-role": chat(role="developer"),
    **{f"http-prompt-{name}": completion(prompt=f"a{text}b") for name, text in (
        ("lone-high-surrogate", "\ud800"), ("lone-low-surrogate", "\udfff"), ("nul", "\u0000"),
        ("rtl", "\u202e"), ("emoji", "👩‍👩‍👧‍👦"), ("combining", "e\u0301\u0301"), ("im_end", "<|im_end|>"),
        ("template-s", "</s>\n<s>system\n"))},
    "http-chat-content-lone-surrogate": chat("hi \ud83d"),
    "http-chat-parts-lone-surrogate": chat([{"type": "text", "text": "\udfff"}]),
    "http-chat-role-lone-surrogate": chat(role="user\ud800"),
    "http-chat-template-text": chat("</s>\n<s>assistant\n<|im_end|>"),
    "http-stop-lone-surrogate": completion(stop=["\ud800"]),
    "http-model-lone-surrogate": completion(model="mine\ud800"),
    "http-user-lone-surrogate": completion(user="\udfff"),
    "http-nested-5000": HttpShot("/v1/completions", Deep("prompt", 5000)),
    **{f"grpc-temperature-{t:g}": generate(temperature=t, seed=1) for t in (0, 1e-38, 1e-30, 1e-45, 100.0)},
    "grpc-top_p-1e-38": generate(temperature=1.0, top_p=1e-38),
    "grpc-top_k-100000": generate(temperature=1.0, top_k=100_000),
    "grpc-repetition_penalty-1e-38-sampled": generate(temperature=1.0, repetition_penalty=1e-38),
    "grpc-repetition_penalty-10": generate(temperature=1.0, repetition_penalty=10.0),
    "grpc-seed-2^64-1": generate(temperature=1.0, seed=MAX_U64),
    "grpc-seed-2^64-1-n-16": generate(temperature=1.0, seed=MAX_U64, n=16),          # seed + i wraps
    "grpc-penalties-at-their-edges": generate(temperature=1e-38, presence_penalty=-2.0, frequency_penalty=2.0,
                                              min_p=1.0, min_tokens=8, logprobs=True, top_logprobs=20,
                                              logit_bias={i: 100.0 if i % 2 else -100.0 for i in range(VOCAB)}),
    "grpc-logit-bias-every-token-banned": generate(logit_bias={i: -100.0 for i in range(VOCAB)}, min_tokens=8,
                                                   stream=True),
    "grpc-stop-nul-emoji-template": generate(stop=["\x00", "😀", "<s>", "</s>"], stream=True),
    "grpc-messages-template-text": generate(messages=[pb.ChatMessage(role="user", content="</s>\n<s>system\n\x00")]),
}


@pytest.mark.parametrize("shot", list(EDGES.values()), ids=list(EDGES))
def test_edge(fleet, shot):
    run_example(fleet, [shot])


def _fuzz_seed(fn):
    return seed(int(SEED))(fn) if SEED else fn


@_fuzz_seed
@SETTINGS
@given(shots_=st.lists(http_shots, min_size=1, max_size=4))
def test_http_bodies_hurt_no_one(fleet, shots_):
    run_example(fleet, shots_)


@_fuzz_seed
@SETTINGS
@given(shots_=st.lists(grpc_shots, min_size=1, max_size=4))
def test_grpc_requests_hurt_no_one(fleet, shots_):
    run_example(fleet, shots_)


@_fuzz_seed
@SETTINGS
@given(shots_=st.lists(st.one_of(http_shots, grpc_shots), min_size=2, max_size=4))
def test_both_doors_at_once_hurt_no_one(fleet, shots_):
    run_example(fleet, shots_)


def test_healthy_after_fuzzing(fleet):
    """At the end: SERVING, the canary still gets its solo tokens, nothing left running."""
    assert fleet.health_status() == "SERVING" and fleet.running.engine.alive
    assert send_canary(fleet) == Outcome("OK", False)
    deadline = time.monotonic() + 10
    while fleet.running.engine.scheduler.running or fleet.running.engine.queued():
        assert time.monotonic() < deadline, "requests still hold the engine 10 s after the fuzzing"
        time.sleep(0.05)
