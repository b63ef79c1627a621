"""Issue 23 on the real default model, SmolLM2-135M-Instruct (found or built in the user cache as
test_real_model.py does): LangChain's `with_structured_output` returns an instance on each of 21
prompts spread over the base and two LoRAs, all at once; `bind_tools` with a named tool gives
arguments that validate; the README's `response_format` example parses. A real tokenizer (49,152
tokens, multi-byte merges) is what these add over the tiny model's tests."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from client import LoraFleetClient
from server.main import BackgroundServer
from server.model.loader import load_model
from tests.integration.conftest import make_config
from tests.integration.test_real_model import smollm2_dir  # noqa: F401 - the model fixture
from tests.serving_fixtures import make_adapter

BASE = "smollm2-135m-instruct"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}


class City(BaseModel):
    """Bounded (a 135M model, greedy, may write the digits of an unbounded number until max_tokens)."""
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def real_door(smollm2_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("structured-real")
    cfg = make_config(root, http_port=0, max_context_tokens=1024, max_new_tokens=160, max_prompt_tokens=800,
                      max_batch_size=32)
    loaded = load_model(smollm2_dir, torch.device("cpu"), torch.float32)
    with BackgroundServer(cfg, loaded) as running:
        with LoraFleetClient(f"127.0.0.1:{running.port}", timeout=120) as c:
            for name, seed in (("lora-a", 1), ("lora-b", 2)):
                c.upload_adapter(make_adapter(smollm2_dir, root / "peft", "lora", seed)[0], name)
        yield running, loaded.name


def chat_openai(running, model: str):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=model, base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key="none",
                      max_tokens=150, temperature=0.7, max_retries=0, timeout=300)


def test_langchain_structured_output_on_smollm2_base_and_two_adapters(real_door):
    running, base = real_door
    cities = ["Paris", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima"]
    prompts = [f"Tell me about {c}: its name, country and population in millions." for c in cities] * 3
    models = [(base, "lora-a", "lora-b")[i % 3] for i in range(len(prompts))]
    bound = {m: chat_openai(running, m).with_structured_output(City) for m in set(models)}
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda mp: bound[mp[0]].invoke(mp[1]), zip(models, prompts)))
    assert len(got) == 21 and all(isinstance(c, City) for c in got), got
    assert any(c.city == "Paris" for c, m in zip(got, models) if m == base), got[:7]


def test_langchain_bind_tools_named_tool_on_smollm2(real_door):
    running, _ = real_door
    llm = chat_openai(running, "lora-a").bind_tools([{"type": "function", "function": WEATHER}],
                                                    tool_choice="get_weather")
    msg = llm.invoke("Is it cold in Oslo right now?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER["parameters"])


def test_sdk_response_format_and_tools_on_smollm2(real_door):
    running, base = real_door
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{running.http_port}/v1", api_key="none", max_retries=0,
                        timeout=300)
    r = api.chat.completions.parse(model=base, response_format=City, max_tokens=60, temperature=0,
                                   messages=[{"role": "user", "content": "The capital of Italy, as JSON."}])
    assert isinstance(r.choices[0].message.parsed, City) and r.choices[0].finish_reason == "stop"
    r = api.chat.completions.create(model=base, tools=[{"type": "function", "function": WEATHER}],
                                    tool_choice="required", max_tokens=80, temperature=0,
                                    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["parameters"])
