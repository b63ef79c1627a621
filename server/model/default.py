"""The embedded default base model: built deterministically, written once as an ordinary
Hugging Face directory, then loaded through the same loader as any user model.

No download ever happens: weights come from a seeded generator, the tokenizer is a
byte-level BPE with no merges (every UTF-8 byte is one token) made with `tokenizers`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)             # ids 0, 1, 2; bytes follow at 3..258
FORMAT_VERSION = 1                     # bump when the construction below changes


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool
    seed: int = 1234


PRESETS = {
    # the model `make serve` runs: small enough for 2 CPU cores, big enough to measure
    "default": Preset(hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                      num_kv_heads=4, tie_embeddings=False),
    # the test fixture: hidden 64, 2 layers
    "tiny": Preset(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, tie_embeddings=False),
}


def _byte_alphabet() -> list[str]:
    """The GPT-2 byte→unicode table, in byte order (what ByteLevel pre-tokenizers emit)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    return tok


def hf_config(p: Preset, vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": p.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def build_weights(p: Preset, vocab_size: int) -> dict[str, torch.Tensor]:
    """Seeded random weights, scaled so activations stay O(1) and greedy text varies."""
    g = torch.Generator().manual_seed(p.seed)
    d, f, hd = p.hidden_size, p.intermediate_size, p.hidden_size // p.num_heads

    def lin(d_out: int, d_in: int) -> torch.Tensor:   # [d_out, d_in]
        return torch.randn(d_out, d_in, generator=g) / d_in ** 0.5

    w = {"model.embed_tokens.weight": torch.randn(vocab_size, d, generator=g)}
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        w[pre + "self_attn.q_proj.weight"] = lin(p.num_heads * hd, d)
        w[pre + "self_attn.k_proj.weight"] = lin(p.num_kv_heads * hd, d)
        w[pre + "self_attn.v_proj.weight"] = lin(p.num_kv_heads * hd, d)
        w[pre + "self_attn.o_proj.weight"] = lin(d, p.num_heads * hd)
        w[pre + "mlp.gate_proj.weight"] = lin(f, d)
        w[pre + "mlp.up_proj.weight"] = lin(f, d)
        w[pre + "mlp.down_proj.weight"] = lin(d, f)
        w[pre + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
        w[pre + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    w["model.norm.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    if not p.tie_embeddings:
        w["lm_head.weight"] = lin(vocab_size, d) * 4.0
    return {k: v.contiguous() for k, v in w.items()}


def write_model_dir(out: Path, preset: str = "default") -> None:
    """Write config.json, model.safetensors and tokenizer files into `out` (must not exist)."""
    p = PRESETS[preset]
    tok = build_tokenizer()
    vocab_size = tok.get_vocab_size()
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf_config(p, vocab_size), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(build_weights(p, vocab_size), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": PAD, "model_max_length": 2048, "add_bos_token": True}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}))


def ensure_default_model(cache_dir: Path, preset: str = "default") -> Path:
    """Return the directory of the embedded model, building it on first use (atomically)."""
    target = Path(cache_dir) / f"lorafleet-{preset}-v{FORMAT_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=cache_dir))
    try:
        write_model_dir(tmp / "m", preset)
        try:
            os.rename(tmp / "m", target)
            log.info("built the embedded %s model into %s", preset, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
