"""Issue 23 on both doors of a real server (the tiny chat model, the `door` of test_openai_http):
logprobs (equal to log_softmax of transformers/PEFT logits, the same on HTTP and gRPC), n choices
(seeded: distinct and reproducible; choice i is seed + i), a list of prompts, seed 0, presence and
frequency penalties, min_p, min_tokens, logit_bias, the developer role; hostile values are a 400 /
INVALID_ARGUMENT naming the field, quickly, with the server unaffected. The official `openai` SDK
is the HTTP client wherever it has the field (extra_body otherwise)."""
from __future__ import annotations

import time

import grpc
import openai
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server.model.chat import ChatTemplate
from server.api.auth import create_key
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.integration.test_openai_http import MODEL, MSGS, grpc_client, raw, sdk
from tests.serving_fixtures import hf_base, make_adapter, oracle_logits_along

QUICK_S = 2.0           # a hostile request's refusal takes at most this long (it is milliseconds)


@pytest.fixture(scope="module")
def door(chat_model_dir, tmp_path_factory):
    """(running server, {tenant: key}) with the default limits (a 4 MiB body: room for 100,000
    logit_bias entries); acme owns the LoRA `mine` (make_adapter's lora, seed 1)."""
    root = tmp_path_factory.mktemp("openai-sampling")
    keys_file = root / "keys.json"
    keys = {"acme": create_key(keys_file, "acme", False)}
    cfg = make_config(root, api_keys=keys_file, http_port=0, max_context_tokens=512, max_new_tokens=64,
                      max_message_bytes=4 * 1024 * 1024)
    loaded = load_model(chat_model_dir, torch.device("cpu"), torch.float32)
    with BackgroundServer(cfg, loaded) as running:
        with grpc_client(running, keys["acme"]) as c:
            c.upload_adapter(make_adapter(chat_model_dir, root / "peft", "lora", 1)[0], "mine")
        yield running, keys


def oracle(chat_model_dir, tmp_path_factory, model: str):
    """The transformers model behind `model`: the HF base, or PEFT's model of the door's `mine`
    (make_adapter is deterministic in its seed: the same weights the door uploaded)."""
    if model == MODEL:
        return hf_base(chat_model_dir)
    return make_adapter(chat_model_dir, tmp_path_factory.mktemp("oracle"), "lora", 1)[1]


def chat_ids(running, messages) -> list[int]:
    loaded = running.engine.loaded
    return loaded.chat.encode([(m["role"], m["content"]) for m in messages], loaded.tokenizer)


# ---------------------------------------------------------------- logprobs
@pytest.mark.parametrize("model", [MODEL, "mine"])
def test_logprobs_equal_log_softmax_of_transformers_logits_on_both_doors(door, chat_model_dir, tmp_path_factory,
                                                                         model):
    running, keys = door
    adapter = "" if model == MODEL else model
    with grpc_client(running, keys["acme"]) as c:
        got = c.chat(MSGS, adapter=adapter, max_new_tokens=10, logprobs=3, temperature=0.9, seed=4,
                     presence_penalty=1.0, ignore_eos=True)
    assert len(got.logprobs) == len(got.token_ids) == 10
    ref = oracle_logits_along(oracle(chat_model_dir, tmp_path_factory, model), chat_ids(running, MSGS),
                              got.token_ids).log_softmax(-1)
    for step, (tok, lp) in enumerate(zip(got.token_ids, got.logprobs)):
        assert lp.token_id == tok and abs(lp.logprob - ref[step, tok].item()) < 1e-4, step
        assert [t.token_id for t in lp.top] == ref[step].topk(3).indices.tolist()
    # the same numbers through the SDK, whole and streamed
    api = sdk(running, keys["acme"])
    ask = dict(model=model, messages=MSGS, max_tokens=10, temperature=0.9, seed=4, presence_penalty=1.0,
               logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    whole = api.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert [(e.token, e.logprob, bytes(e.bytes)) for e in content] == \
        [(lp.token, pytest.approx(lp.logprob, abs=1e-6), lp.bytes) for lp in got.logprobs]
    assert [[t.token for t in e.top_logprobs] for e in content] == [[t.token for t in lp.top] for lp in got.logprobs]
    streamed = [e for ch in api.chat.completions.create(**ask, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    no = api.chat.completions.create(model=model, messages=MSGS, max_tokens=2)
    assert no.choices[0].logprobs is None


def test_completions_logprobs_in_the_legacy_shape(door):
    running, keys = door
    with grpc_client(running, keys["acme"]) as c:
        want = c.generate("the quick brown fox", max_new_tokens=8, logprobs=2, ignore_eos=True)
    got = sdk(running, keys["acme"]).completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=8,
                                                        temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert lp.tokens == [t.token for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for entry, t in zip(lp.top_logprobs, want.logprobs):
        assert set(entry) == {x.token for x in t.top} | {t.token} and len(entry) <= 3     # top 2 and the sampled


# ---------------------------------------------------------------- n and lists of prompts
def test_n4_seeded_gives_4_distinct_reproducible_completions_on_both_doors(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    ask = dict(model="mine", prompt="once upon a time", max_tokens=12, temperature=1.0, seed=7, n=4,
               extra_body={"ignore_eos": True})
    first, again = api.completions.create(**ask), api.completions.create(**ask)
    texts = [ch.text for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2, 3] and len(set(texts)) == 4
    assert [ch.text for ch in again.choices] == texts
    assert first.usage.completion_tokens == 48 and first.usage.prompt_tokens == again.usage.prompt_tokens
    # choice i is the request seeded seed + i
    alone = api.completions.create(**{**ask, "n": 1, "seed": 9})
    assert alone.choices[0].text == texts[2]
    # streamed: chunks of the 4 choices interleave, each naming its index
    parts = {i: "" for i in range(4)}
    for ch in api.completions.create(**ask, stream=True):
        for c in ch.choices:
            parts[c.index] += c.text
    assert [parts[i] for i in range(4)] == texts
    with grpc_client(running, keys["acme"]) as c:
        r = c.generate("once upon a time", adapter="mine", max_new_tokens=12, temperature=1.0, seed=7, n=4,
                       ignore_eos=True)
        pieces = {i: "" for i in range(4)}
        for piece in c.generate_stream("once upon a time", adapter="mine", max_new_tokens=12, temperature=1.0,
                                       seed=7, n=4, ignore_eos=True):
            pieces[piece.index] += piece.text
    assert [ch.text for ch in r.choices] == texts == [pieces[i] for i in range(4)]
    assert r.text == texts[0] and r.completion_tokens == 48
    chat = api.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=1.0, seed=7, n=4,
                                       extra_body={"ignore_eos": True})
    assert len({ch.message.content for ch in chat.choices}) == 4


def test_a_list_of_prompts_gives_n_choices_each_in_openais_order(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    prompts = ["the quick brown fox", "hello there"]
    kw = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    both = api.completions.create(prompt=prompts, **kw)
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]
    singles = [api.completions.create(prompt=p, **kw) for p in prompts]
    assert [ch.text for ch in both.choices] == [ch.text for s in singles for ch in s.choices]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 4 * 6


def test_seed_0_is_a_seed_on_both_doors(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    ask = dict(model=MODEL, prompt="seeds", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    zero = [api.completions.create(**ask, seed=0).choices[0].text for _ in range(2)]
    one = api.completions.create(**ask, seed=1).choices[0].text
    assert zero[0] == zero[1] != one
    with grpc_client(running, keys["acme"]) as c:
        g = c.generate("seeds", max_new_tokens=16, temperature=1.0, seed=0, ignore_eos=True)
        unseeded = {c.generate("seeds", max_new_tokens=16, temperature=1.0, ignore_eos=True).text for _ in range(3)}
    assert g.text == zero[0] and len(unseeded) > 1


# ---------------------------------------------------------------- penalties, min_p, min_tokens, logit_bias
def test_penalties_and_min_p_are_the_same_on_both_doors_and_change_the_answer(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    base = dict(model="mine", prompt="a a a a", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    plain = api.completions.create(**base).choices[0].text
    pen = api.completions.create(**base, presence_penalty=1.5, frequency_penalty=2.0).choices[0].text
    with grpc_client(running, keys["acme"]) as c:
        g = c.generate("a a a a", adapter="mine", max_new_tokens=40, presence_penalty=1.5, frequency_penalty=2.0,
                       ignore_eos=True)
        m = c.generate("a a a a", adapter="mine", max_new_tokens=8, temperature=1.5, seed=2, min_p=1.0,
                       ignore_eos=True)
        greedy = c.generate("a a a a", adapter="mine", max_new_tokens=8, ignore_eos=True)
    assert pen == g.text != plain
    assert m.token_ids == greedy.token_ids          # min_p 1 keeps only the top token: greedy whatever the temperature
    sampled = api.completions.create(**{**base, "max_tokens": 8, "temperature": 1.5, "seed": 2,
                                        "extra_body": {"ignore_eos": True, "min_p": 1.0}})
    assert sampled.choices[0].text == greedy.text


def test_logit_bias_forces_and_bans_and_min_tokens_holds_back_the_end(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    eos = str(next(iter(running.engine.loaded.eos_ids)))
    forced = api.completions.create(model=MODEL, prompt="hi", max_tokens=16, temperature=0, logit_bias={eos: 100})
    assert forced.usage.completion_tokens == 1 and forced.choices[0].finish_reason == "stop"
    held = api.completions.create(model=MODEL, prompt="hi", max_tokens=16, temperature=0, logit_bias={eos: 100},
                                  extra_body={"min_tokens": 5})
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"
    with grpc_client(running, keys["acme"]) as c:
        first = c.generate("hi", max_new_tokens=1).token_ids[0]
        banned = c.generate("hi", max_new_tokens=1, logit_bias={first: -100.0}).token_ids[0]
        x = c.generate("hi", max_new_tokens=4, logit_bias={100: 100.0}, ignore_eos=True).token_ids
    assert banned != first and x == [100] * 4


def test_the_developer_role_is_system_where_the_template_has_none(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    as_system = api.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    as_dev = api.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                         messages=[{"role": "developer", "content": "be brief"}, MSGS[1]])
    assert as_dev.choices[0].message.content == as_system.choices[0].message.content
    assert as_dev.usage.prompt_tokens == as_system.usage.prompt_tokens
    with grpc_client(running, keys["acme"]) as c:
        g = c.chat([("developer", "be brief"), ("user", "hello there")], max_new_tokens=8)
    assert g.text == as_system.choices[0].message.content


def test_a_template_that_names_the_developer_role_gets_it():
    source = ("{% for m in messages %}{% if m['role'] not in ['developer', 'system', 'user', 'assistant'] %}"
              "{{ raise_exception('no') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert ChatTemplate(source, "", "", frozenset()).roles() == ("system", "user", "assistant", "developer")
    plain = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
             "{{ raise_exception('no') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert "developer" not in ChatTemplate(plain, "", "", frozenset()).roles()


# ---------------------------------------------------------------- hostile values
def field_of(err: grpc.RpcError) -> str:
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(bad)
    return bad.field_violations[0].field


@pytest.mark.parametrize("path, extra, param, words", [
    ("/v1/completions", {"logit_bias": {str(i): 1.0 for i in range(100_000)}}, "logit_bias", "max-json-items"),
    ("/v1/completions", {"logit_bias": {str(i): 1.0 for i in range(5000)}}, "logit_bias", "at most 1024"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1000}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ("/v1/completions", {"logprobs": 1000}, "logprobs", "[0, 20]"),
    ("/v1/completions", {"n": 10 ** 6}, "n", "out of range [1, 16]"),
    ("/v1/chat/completions", {"n": 2 ** 40}, "n", "less than or equal"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"logit_bias": {"1.5": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"logit_bias": {"99999999999": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"logit_bias": {"4294967295": 1}}, "logit_bias", "not a token id of this model"),
    ("/v1/completions", {"logit_bias": {"5": "high"}}, "logit_bias", "valid number"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "[-2.0, 2.0]"),
    ("/v1/completions", {"min_p": -0.1}, "min_p", "[0.0, 1.0]"),
    ("/v1/completions", {"min_tokens": 17, "max_tokens": 16}, "min_tokens", "[0, 16]"),
    ("/v1/completions", {"min_tokens": 65}, "min_tokens", "[0, 4]"),
    ("/v1/completions", {"prompt": ["x"] * 65}, "prompt", "at most 64"),
    ("/v1/chat/completions", {"messages": [{"role": "developer", "content": ""}]}, "messages[0].content", "empty"),
])
def test_hostile_sampling_values_are_a_quick_400_naming_the_field(door, path, extra, param, words):
    running, keys = door
    body = {"model": MODEL, "max_tokens": 4, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": MSGS}),
            **extra}
    start = time.monotonic()
    r = raw(running, keys["acme"]).post(path, json=body)
    took = time.monotonic() - start
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and len(r.content) < 1500, err
    assert took < QUICK_S


def test_hostile_values_through_the_sdk_and_grpc_leave_the_server_unaffected(door):
    running, keys = door
    api = sdk(running, keys["acme"])
    with grpc_client(running, keys["acme"]) as c:
        canary = c.generate("the canary", adapter="mine", max_new_tokens=12, ignore_eos=True).token_ids
    for kw, param in (({"logit_bias": {str(i): 1 for i in range(100_000)}}, "logit_bias"),
                      ({"logprobs": True, "top_logprobs": 1000}, "top_logprobs"), ({"n": 10 ** 6}, "n")):
        start = time.monotonic()
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, **kw)
        assert e.value.param == param and time.monotonic() - start < QUICK_S
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    md = (("authorization", f"Bearer {keys['acme']}"),)
    for params, field in ((pb.SamplingParams(logit_bias={i: 1.0 for i in range(100_000)}), "params.logit_bias"),
                          (pb.SamplingParams(logit_bias={259: 1.0}), "params.logit_bias"),
                          (pb.SamplingParams(logit_bias={3: float("nan")}), "params.logit_bias"),
                          (pb.SamplingParams(logprobs=True, top_logprobs=1000), "params.top_logprobs"),
                          (pb.SamplingParams(n=10 ** 6), "params.n"),
                          (pb.SamplingParams(presence_penalty=3.0), "params.presence_penalty"),
                          (pb.SamplingParams(frequency_penalty=float("inf")), "params.frequency_penalty"),
                          (pb.SamplingParams(min_p=2.0), "params.min_p"),
                          (pb.SamplingParams(max_new_tokens=4, min_tokens=5), "params.min_tokens")):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt="hi", params=params), metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(e.value) == field, e.value.details()
        assert time.monotonic() - start < QUICK_S
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with grpc_client(running, keys["acme"]) as c:
        assert c.generate("the canary", adapter="mine", max_new_tokens=12, ignore_eos=True).token_ids == canary
        info = c.server_info().limits
    assert (info.max_n, info.max_top_logprobs, info.max_logit_bias) == (16, 20, 1024)
