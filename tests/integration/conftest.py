"""A real server on 127.0.0.1 port 0 over the tiny model; clients use real gRPC channels."""
from __future__ import annotations

import dataclasses
import json
import shutil

import grpc
import pytest

from client import LoraFleetClient
from server.config import ServerConfig
from server.main import BackgroundServer


def make_config(tmp_path, **kw) -> ServerConfig:
    base = dict(host="127.0.0.1", port=0, metrics_port=0, data_dir=tmp_path / "data",
                cache_dir=tmp_path / "models", max_batch_size=8, max_context_tokens=256,
                max_prompt_tokens=200, max_new_tokens=48, default_new_tokens=16, max_queued_requests=64)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("srv"))
    with BackgroundServer(cfg, tiny_loaded) as running:
        yield running


@pytest.fixture()
def client(server):
    c = LoraFleetClient(f"127.0.0.1:{server.port}", timeout=60)
    yield c
    c.close()


def replace(cfg: ServerConfig, **kw) -> ServerConfig:
    return dataclasses.replace(cfg, **kw)


def code_of(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


# A ChatML-like template for the tiny model (its special tokens <s> </s> mark turns); chat tests
# serve a copy of the tiny model's directory with it added.
TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    shutil.copytree(tiny_model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=TEMPLATE, eos_token="</s>", bos_token="<s>")
    cfg_path.write_text(json.dumps(cfg))
    return d
