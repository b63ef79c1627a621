"""Issue 23 phase 2 on both doors of a real server (the tiny chat model: random weights, so only the
constraint can make its output valid): OpenAI's `response_format` (json_schema, json_object) through
the official SDK, whole and streamed; vLLM's `structured_outputs` and `guided_*`; the gRPC
`SamplingParams` constraint; LangChain's `with_structured_output` on base + two adapters at once and
`bind_tools` with a named tool; tool calls (required, named, auto, streamed) and tool history; a
hypothesis property through the HTTP door; hostile constraints and tools, each a quick 400 /
INVALID_ARGUMENT naming the field, with the server serving afterwards."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from client.common import call_metadata
from lorafleet.v1 import lorafleet_pb2 as pb
from lorafleet.v1 import lorafleet_pb2_grpc as pb_grpc
from server.api.auth import create_key
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.integration.test_openai_http import MODEL, grpc_client, raw, sdk
from tests.serving_fixtures import make_adapter

QUICK_S = 15.0     # a deadline against a hang (an exploding compile would run for minutes), not a speed test: ms when quiet
ASK = [{"role": "user", "content": "describe a pet"}]
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "emu"]}, "legs": {"type": "integer",
       "minimum": 0, "maximum": 8}, "tame": {"type": "boolean"}, "name": {"type": "string", "maxLength": 6}},
       "required": ["kind", "legs", "tame", "name"], "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                          "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "the time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
                       "additionalProperties": False}}


class Pet(BaseModel):
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog", "emu"]})
    legs: int = Field(ge=0, le=8)
    tame: bool
    name: str = Field(max_length=6)


@pytest.fixture(scope="module")
def door(chat_model_dir, tmp_path_factory):
    """(running server, acme's key); acme owns the LoRAs `mine` and `yours`. Bodies up to 16 MiB, so
    that a 10 MB schema reaches the constraint's own limit."""
    root = tmp_path_factory.mktemp("structured")
    keys_file = root / "keys.json"
    key = create_key(keys_file, "acme", False)
    cfg = make_config(root, api_keys=keys_file, http_port=0, max_context_tokens=2048, max_new_tokens=160,
                      max_prompt_tokens=1800, max_message_bytes=16 << 20, max_batch_size=16)
    loaded = load_model(chat_model_dir, torch.device("cpu"), torch.float32)
    with BackgroundServer(cfg, loaded) as running:
        with grpc_client(running, key) as c:
            for name, seed in (("mine", 1), ("yours", 2)):
                c.upload_adapter(make_adapter(chat_model_dir, root / "peft", "lora", seed)[0], name)
        yield running, key


def still_serving(running, key) -> None:
    got = sdk(running, key).chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    assert got.choices[0].finish_reason in ("length", "stop")


def pet_format(schema=PET) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


# ---------------------------------------------------------------- the SDK's response_format
@pytest.mark.parametrize("model", [MODEL, "mine"])
def test_sdk_response_format_json_schema_whole_and_streamed(door, model):
    running, key = door
    api = sdk(running, key)
    for seed in range(3):
        ask = dict(model=model, messages=ASK, max_tokens=120, temperature=1.0, seed=seed, response_format=pet_format())
        whole = api.chat.completions.create(**ask)
        jsonschema.validate(json.loads(whole.choices[0].message.content), PET)
        assert whole.choices[0].finish_reason == "stop"
        text = "".join(ch.choices[0].delta.content or "" for ch in api.chat.completions.create(**ask, stream=True)
                       if ch.choices)
        assert text == whole.choices[0].message.content
    parsed = api.chat.completions.parse(model=model, messages=ASK, max_tokens=120, response_format=Pet)
    assert isinstance(parsed.choices[0].message.parsed, Pet)


def test_sdk_response_format_json_object_whole_and_streamed(door, chat_model_dir):
    """Any JSON object; '}' favoured by logit_bias (applied before the mask) closes it at once."""
    running, key = door
    api = sdk(running, key)
    close = running.engine.loaded.tokenizer.encode("}", add_special_tokens=False).ids[0]
    ask = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=0, response_format={"type": "json_object"})
    free = api.chat.completions.create(**ask)
    if free.choices[0].finish_reason == "stop":          # a random model may use up max_tokens inside a string
        assert isinstance(json.loads(free.choices[0].message.content), dict)
    assert free.choices[0].message.content.startswith("{")
    biased = api.chat.completions.create(**ask, logit_bias={str(close): 30})
    assert biased.choices[0].message.content == "{}" and biased.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       api.chat.completions.create(**ask, logit_bias={str(close): 30}, stream=True) if ch.choices)
    assert streamed == "{}"
    text = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0,
                                       response_format={"type": "text"})
    plain = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_vllm_structured_outputs_and_guided_fields_on_both_routes(door):
    running, key = door
    api = sdk(running, key)
    got = api.completions.create(model=MODEL, prompt="answer:", max_tokens=20, temperature=1.0, seed=1,
                                 extra_body={"structured_outputs": {"regex": "(yes|no), [0-9]{3}"}})
    assert got.choices[0].text.split(", ")[0] in ("yes", "no") and got.choices[0].finish_reason == "stop"
    for body in ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, {"guided_choice": ["up", "down"]}):
        got = api.chat.completions.create(model="mine", messages=ASK, max_tokens=10, temperature=1.0, extra_body=body)
        assert got.choices[0].message.content in (body.get("guided_choice") or body["structured_outputs"]["choice"])
    got = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, extra_body={"guided_json": PET})
    jsonschema.validate(json.loads(got.choices[0].message.content), PET)
    got = api.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=1.0,
                                 extra_body={"guided_grammar": 'start: "a" b\nb: "1" | "2"'})
    assert got.choices[0].text in ("a1", "a2")
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format=pet_format(),
                                    extra_body={"guided_regex": "a+"})
    assert e.value.param == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=MODEL, prompt="x", max_tokens=5,
                               extra_body={"structured_outputs": {"regex": "a", "grammar": "start: \"a\""}})
    assert e.value.param == "structured_outputs"


def test_grpc_sampling_params_constraint(door):
    running, key = door
    md = call_metadata(key, None)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
        assert info.limits.max_constraint_bytes == running.cfg.max_constraint_bytes > 0
        got = stub.Generate(pb.GenerateRequest(prompt="pet:", params=pb.SamplingParams(
            max_new_tokens=120, temperature=1.0, seed=3, json_schema=json.dumps(PET))), metadata=md)
        jsonschema.validate(json.loads(got.text), PET)
        assert got.finish_reason == pb.FINISH_REASON_STOP
        got = stub.Generate(pb.GenerateRequest(prompt="pet:", adapter="yours", params=pb.SamplingParams(
            max_new_tokens=10, regex="[0-9]{4}")), metadata=md)
        assert len(got.text) == 4 and got.text.isdigit()
        chunks = list(stub.GenerateStream(pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            params=pb.SamplingParams(max_new_tokens=120, temperature=1.0, json_schema=json.dumps(PET))), metadata=md))
        jsonschema.validate(json.loads("".join(c.text for c in chunks)), PET)
        with grpc_client(running, key) as c:                # the client library's keywords
            got = c.chat([("user", "hi")], adapter="mine", max_new_tokens=120, temperature=1.0, json_schema=PET)
            jsonschema.validate(json.loads(got.text), PET)
            assert c.generate("x", max_new_tokens=8, regex="(yes|no)").text in ("yes", "no")
            with pytest.raises(ValueError, match="at most one"):
                c.generate("x", regex="a", grammar='start: "a"')
        for field, params in (("params.json_schema", pb.SamplingParams(json_schema="{not json")),
                              ("params.regex", pb.SamplingParams(regex="(")),
                              ("params.grammar", pb.SamplingParams(grammar="start: nope"))):
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(prompt="x", params=params), metadata=md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
            assert time.monotonic() - t < QUICK_S


# ---------------------------------------------------------------- LangChain
def chat_openai(running, key, model: str):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=model, base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key=key,
                      max_tokens=120, temperature=1.0, max_retries=0, timeout=120)


def test_langchain_with_structured_output_base_and_two_adapters_concurrently(door):
    running, key = door
    prompts = [f"describe pet number {i}" for i in range(24)]
    models = [(MODEL, "mine", "yours")[i % 3] for i in range(len(prompts))]
    bound = {m: chat_openai(running, key, m).with_structured_output(Pet) for m in set(models)}
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda mp: bound[mp[0]].invoke(mp[1]), zip(models, prompts)))
    assert len(got) == 24 and all(isinstance(p, Pet) for p in got), got


def test_langchain_bind_tools_named_tool_gives_valid_arguments(door):
    running, key = door
    llm = chat_openai(running, key, "mine").bind_tools(
        [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}],
        tool_choice="get_weather")
    for i in range(3):
        msg = llm.invoke(f"weather please {i}")
        (call,) = msg.tool_calls
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(call["args"], WEATHER["parameters"])


# ---------------------------------------------------------------- tools through the SDK
def test_tool_choice_required_named_auto_and_none(door):
    running, key = door
    api = sdk(running, key)
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    named = api.chat.completions.create(model=MODEL, messages=ASK, tools=tools, max_tokens=100, temperature=1.0,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    c = named.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TIME["parameters"])
    req = api.chat.completions.create(model="yours", messages=ASK, tools=tools, tool_choice="required",
                                      max_tokens=150, temperature=1.0, seed=2)
    calls = req.choices[0].message.tool_calls
    assert req.choices[0].finish_reason == "tool_calls" and calls
    by_name = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name]["parameters"])
    one = api.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=100, temperature=1.0)
    assert len(one.choices[0].message.tool_calls) == 1
    # auto: a random model writes text, which is content; none: no tools read
    auto = api.chat.completions.create(model=MODEL, messages=ASK, tools=tools, max_tokens=8, temperature=0)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    none = api.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None


def test_auto_reads_a_call_the_model_writes(door):
    """auto is parsed as vLLM's hermes parser does: forced here with a regex the reply must match."""
    running, key = door
    call = '{"name": "get_time", "arguments": {"zone": "cet"}}'
    got = sdk(running, key).chat.completions.create(
        model=MODEL, messages=ASK, tools=[{"type": "function", "function": TIME}], max_tokens=80,
        extra_body={"guided_regex": f"<tool_call>{call}</tool_call>".replace("{", r"\{").replace("}", r"\}")})
    c = got.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_time"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"zone": "cet"}


def test_streamed_tool_calls_in_openais_delta_shape(door):
    running, key = door
    api = sdk(running, key)
    chunks = list(api.chat.completions.create(
        model="mine", messages=ASK, tools=[{"type": "function", "function": WEATHER}], max_tokens=100,
        temperature=1.0, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # the SDK's own stream helper accumulates the same call
    with api.chat.completions.stream(model="mine", messages=ASK, tools=[{"type": "function", "function": WEATHER}],
                                     max_tokens=100, tool_choice="required", parallel_tool_calls=False) as s:
        final = s.get_final_completion()
    jsonschema.validate(json.loads(final.choices[0].message.tool_calls[0].function.arguments), WEATHER["parameters"])


def test_tool_history_is_accepted_and_rendered(door):
    running, key = door
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snowing"}]
    got = sdk(running, key).chat.completions.create(model=MODEL, messages=history, max_tokens=4,
                                                    tools=[{"type": "function", "function": WEATHER}])
    assert got.choices[0].finish_reason in ("stop", "length", "tool_calls")
    loaded = running.engine.loaded
    from server.api.requests import render_chat
    from server.api.tools import Tool, Tools
    ids = render_chat((("user", "hi"), ("assistant", '{"name": "get_weather", "arguments": {}}'), ("tool", "-3")),
                      loaded.chat, loaded.chat.roles(), loaded.tokenizer, running.cfg,
                      tools=Tools((Tool("get_weather", "w", json.dumps(WEATHER["parameters"])),)))
    text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    assert "get_weather" in text and "Result of the function call:\n-3" in text and "You can call" in text


# ---------------------------------------------------------------- property: schemas through the door
_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.lists(st.sampled_from(["a", "bb", "x y", "é"]), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
    st.integers(0, 5).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "null"}))
_node = st.recursive(_leaf, lambda inner: st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False}),
    inner.map(lambda item: {"type": "array", "items": item, "maxItems": 2})), max_leaves=4)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(schema=_node, seed=st.integers(0, 1000))
def test_property_every_schema_through_the_http_door_validates(door, schema, seed):
    running, key = door
    got = sdk(running, key).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=150, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert got.choices[0].finish_reason == "stop", (schema, got.choices[0].message.content)
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)


# ---------------------------------------------------------------- hostile
def _refused(fn, param: str) -> None:
    t = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        fn()
    assert e.value.param == param, (e.value.param, e.value.body)
    assert time.monotonic() - t < QUICK_S, f"{param}: {time.monotonic() - t:.1f}s"


def test_hostile_constraints_and_tools_are_quick_400s_naming_the_field(door):
    running, key = door
    api = sdk(running, key)
    chat = lambda **kw: api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)  # noqa: E731
    huge = {"type": "string", "description": "x" * (10 * 1024 * 1024)}
    _refused(lambda: chat(response_format=pet_format(huge)), "response_format.json_schema.schema")
    loop = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    _refused(lambda: chat(response_format=pet_format(loop)), "response_format.json_schema.schema")
    _refused(lambda: chat(response_format=pet_format({"type": "array", "uniqueItems": True})),
             "response_format.json_schema.schema")
    _refused(lambda: chat(extra_body={"structured_outputs": {"regex": "(" * 50}}), "structured_outputs.regex")
    _refused(lambda: chat(extra_body={"guided_grammar": "start: x\nx: x"}), "guided_grammar")
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(10_000)]
    _refused(lambda: chat(tools=many), "tools")
    _refused(lambda: chat(tools=many[:3], tool_choice={"type": "function", "function": {"name": "nope"}}),
             "tool_choice")
    big = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 2000}} for i in range(100)]
    _refused(lambda: chat(tools=big), "tools")
    still_serving(running, key)


def test_exploding_regexes_serve_or_fail_alone_quickly(door):
    """llguidance builds regexes lazily: a DFA-exploding one is accepted and generates at once; one
    that passes its expression limit at the first token is a quick 400 naming the field (raised on
    the engine thread, for that row alone)."""
    running, key = door
    api = sdk(running, key)
    t = time.monotonic()
    got = api.completions.create(model=MODEL, prompt="x", max_tokens=30, temperature=1.0,
                                 extra_body={"structured_outputs": {"regex": r"(a|b)*a(a|b){25}"}})
    assert set(got.choices[0].text) <= {"a", "b"} and time.monotonic() - t < QUICK_S
    _refused(lambda: api.completions.create(model=MODEL, prompt="x", max_tokens=30,
                                            extra_body={"structured_outputs": {"regex": r"((a{100}){100}){100}"}}),
             "structured_outputs.regex")
    still_serving(running, key)


def test_raw_http_errors_keep_openais_shape(door):
    running, key = door
    with raw(running, key) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK,
                                                    "response_format": {"type": "json_schema",
                                                                        "json_schema": {"name": "x", "schema": []}}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK,
                                                    "response_format": {"type": "yaml"}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")
