"""Read a local Hugging Face Llama-family directory: config.json, *.safetensors, tokenizer.json.

Only a local directory, never pickle: a directory without safetensors weights is refused.
GGUF files and hub ids become such directories first (`default.resolve_model`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from server.model.chat import ChatTemplate, load_chat_template
from server.model.llama import LlamaModel
from server.model.shape import BaseModelShape

SUPPORTED = {"llama", "mistral", "qwen2"}
MAX_CONFIG_BYTES = 1 << 20
MARKER = "lorafleet-source.json"   # the provenance file of an entry `convert` built in the model cache


class ModelLoadError(Exception):
    """The directory is not a model this server can load; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaModel
    tokenizer: Tokenizer
    name: str                     # directory name, shown by GetServerInfo
    eos_ids: frozenset[int]
    hf_config: dict
    chat: ChatTemplate | None = None      # the tokenizer's chat template, when it has one


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in SUPPORTED:
        raise ModelLoadError(f"{path}: model_type {cfg.get('model_type')!r} is not one of {sorted(SUPPORTED)}")
    return cfg


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (pickle checkpoints are not loaded)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                weights[k] = sf.get_tensor(k)
    return weights


def _small_json(path: Path) -> dict:
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def eos_ids(model_dir: Path, cfg: dict, tokenizer: Tokenizer | None = None) -> frozenset[int]:
    """Every id that ends generation: config.json's and generation_config.json's `eos_token_id`,
    and the tokenizer's own `eos_token` (for an instruct model, the end-of-turn token)."""
    ids = _ids(cfg.get("eos_token_id")) | _ids(_small_json(model_dir / "generation_config.json").get("eos_token_id"))
    eos = _small_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):                       # an AddedToken written out in full
        eos = eos.get("content")
    if tokenizer is not None and isinstance(eos, str) and (tid := tokenizer.token_to_id(eos)) is not None:
        ids.add(tid)
    return frozenset(ids)


def check_model_dir(model_dir: Path) -> dict:
    """The cheap checks (no weights read): a directory with a supported config.json, a
    tokenizer.json and safetensors weights. Returns the config."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory (models load from a local directory only)")
    cfg = read_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelLoadError(f"{model_dir}: no tokenizer.json")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (pickle checkpoints are not loaded)")
    return cfg


def display_name(model_dir: Path) -> str:
    """The model's name for GetServerInfo and /v1/models: the directory name, less the cache key
    our converted entries carry (`smollm2-135m-instruct-7197cfd0b111` -> `smollm2-135m-instruct`)."""
    if (model_dir / MARKER).is_file():
        return re.sub(r"-[0-9a-f]{12}$", "", model_dir.name)
    return model_dir.name


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    model_dir = Path(model_dir)
    cfg = check_model_dir(model_dir)
    weights = read_weights(model_dir)
    try:
        shape = BaseModelShape.from_hf_config(cfg)
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}/config.json: field {e.args[0]} is missing") from None
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{model_dir}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    try:
        model = LlamaModel.from_hf_weights(shape, weights, device=device, dtype=dtype)
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}: weight {e.args[0]} is missing") from None
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: {e}") from None
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return LoadedModel(model=model, tokenizer=tokenizer, name=display_name(model_dir),
                       eos_ids=eos_ids(model_dir, cfg, tokenizer), hf_config=cfg,
                       chat=load_chat_template(model_dir, tokenizer))
