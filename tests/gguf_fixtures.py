"""Small GGUF files written with the `gguf` package's own writer: a complete little Llama (which
transformers converts, byte-level tokenizer), and the same with one thing wrong."""
from __future__ import annotations

from pathlib import Path

import numpy as np

D, HEADS, KV_HEADS, FFN = 64, 4, 2, 128


def byte_tokens() -> list[str]:
    """The GPT-2 byte→unicode alphabet: a complete byte-level vocabulary without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def llama_tensors(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """name -> numpy shape (the reverse of GGUF's ne0-first dims)."""
    hd = D // HEADS
    shapes = {"token_embd.weight": (vocab, D), "output_norm.weight": (D,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.attn_q.weight": (HEADS * hd, D), f"blk.{i}.attn_k.weight": (KV_HEADS * hd, D),
                       f"blk.{i}.attn_v.weight": (KV_HEADS * hd, D), f"blk.{i}.attn_output.weight": (D, HEADS * hd),
                       f"blk.{i}.ffn_gate.weight": (FFN, D), f"blk.{i}.ffn_up.weight": (FFN, D),
                       f"blk.{i}.ffn_down.weight": (D, FFN)})
    return shapes


def llama_gguf(path: Path, arch: str = "llama", layers: int = 1, drop: tuple[str, ...] = (),
               reshape: dict[str, tuple[int, ...]] | None = None, tokenizer: bool = True, note: str = "") -> Path:
    """A complete little `arch` model (float32, seeded), less the tensors in `drop`, with the numpy
    shapes in `reshape` instead; `note` goes into general.name (different bytes, same model)."""
    import gguf
    tokens = [*byte_tokens(), "Ġt"]                 # one merge: "Ġ t"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(note or "tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(["Ġ t"])
        w.add_token_types([1] * len(tokens))
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    for name, shape in llama_tensors(layers, len(tokens)).items():
        if name not in drop:
            shape = (reshape or {}).get(name, shape)
            w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
