"""Our Llama forward against transformers' LlamaForCausalLM on the same weights."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import KVCache
from server.model.loader import load_model
from server.model.llama import LlamaModel
from server.model.shape import BaseModelShape

CPU = torch.device("cpu")


def hf_model(model_dir):
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_prefill_logits_match_hf(tiny_model_dir, tiny_loaded):
    hf = hf_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (1, 5, 17)]
    kv, tables = KVCache.for_sequences(tiny_loaded.model.shape, [len(p) for p in prompts], CPU, torch.float32, 4)
    segs = [Segment(tables[i], token_ids=p, first_pos=0, want_logits=True) for i, p in enumerate(prompts)]
    ours = tiny_loaded.model.forward(make_forward_batch(segs, CPU, 4), kv.layers)
    for i, p in enumerate(prompts):
        ref = hf(torch.tensor([p])).logits[0, -1]
        assert rel(ours[i], ref) < 1e-4


def test_chunked_prefill_and_decode_match_hf(tiny_model_dir, tiny_loaded):
    """Prefill in two chunks, then decode tokens one by one, mixed with another sequence."""
    hf = hf_model(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 259, (12,), generator=g).tolist()
    b = torch.randint(3, 259, (7,), generator=g).tolist()
    model = tiny_loaded.model
    kv, (ta, tb) = KVCache.for_sequences(model.shape, [64, 64], CPU, torch.float32, 4)
    model.forward(make_forward_batch([Segment(ta, a[:5], 0, False)], CPU, 4), kv.layers)
    out = model.forward(make_forward_batch([Segment(ta, a[5:], 5, True), Segment(tb, b, 0, True)], CPU, 4),
                        kv.layers)
    assert rel(out[0], hf(torch.tensor([a])).logits[0, -1]) < 1e-4
    assert rel(out[1], hf(torch.tensor([b])).logits[0, -1]) < 1e-4
    for step in range(4):
        na, nb = int(out[0].argmax()), int(out[1].argmax())
        a.append(na)
        b.append(nb)
        out = model.forward(make_forward_batch(
            [Segment(tb, [nb], len(b) - 1, True), Segment(ta, [na], len(a) - 1, True)], CPU, 4), kv.layers)
        out = out[[1, 0]]
        assert rel(out[0], hf(torch.tensor([a])).logits[0, -1]) < 1e-4
        assert rel(out[1], hf(torch.tensor([b])).logits[0, -1]) < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_and_tied_embeddings_match_hf(rope, tmp_path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=101, tie_word_embeddings=True,
                      rope_parameters={"rope_theta": 500.0, **rope})
    torch.manual_seed(3)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours_args = BaseModelShape.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert ours_args.rope_type == rope["rope_type"] and ours_args.tie_embeddings
    w = {k: v for k, v in hf.state_dict().items()}
    model = LlamaModel.from_hf_weights(ours_args, w, CPU, torch.float32)
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    kv, (t,) = KVCache.for_sequences(model.shape, [64], CPU, torch.float32)
    ours = model.forward(make_forward_batch([Segment(t, ids, 0, True)], CPU, 16), kv.layers)
    assert rel(ours[0], hf(torch.tensor([ids])).logits[0, -1]) < 1e-4


def test_greedy_generation_matches_hf(tiny_model_dir, tiny_loaded):
    hf = hf_model(tiny_model_dir)
    prompt = tiny_loaded.tokenizer.encode("The quick brown fox").ids
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    model = tiny_loaded.model
    kv, (table,) = KVCache.for_sequences(model.shape, [64], CPU, torch.float32, 4)
    out = model.forward(make_forward_batch([Segment(table, prompt, 0, True)], CPU, 4), kv.layers)
    got = []
    for _ in range(20):
        t = int(out[0].argmax())
        got.append(t)
        out = model.forward(make_forward_batch([Segment(table, [t], len(prompt) + len(got) - 1, True)], CPU, 4),
                            kv.layers)
    assert got == ref
    assert len(set(got)) > 1, "degenerate model output proves little"


def test_loader_refuses_pickle_only_dirs(tmp_path):
    from server.model.loader import ModelLoadError
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path, CPU, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_model(tmp_path, CPU, torch.float32)


def test_bfloat16_forward_tracks_float32(tiny_model_dir, tiny_loaded):
    """The GPU default dtype, exercised on CPU: bf16 logits within bf16 tolerance of fp32."""
    bf = load_model(tiny_model_dir, CPU, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (3, 11)]
    kv32, tables = KVCache.for_sequences(tiny_loaded.model.shape, [32, 32], CPU, torch.float32)
    kv16, _ = KVCache.for_sequences(bf.model.shape, [32, 32], CPU, torch.bfloat16)
    segs = [Segment(tables[i], token_ids=p, first_pos=0, want_logits=True) for i, p in enumerate(prompts)]
    want = tiny_loaded.model.forward(make_forward_batch(segs, CPU, 16), kv32.layers)
    got = bf.model.forward(make_forward_batch(segs, CPU, 16), kv16.layers)
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), want) < 2e-2
    dec = [Segment(tables[i], token_ids=[7], first_pos=len(p), want_logits=True) for i, p in enumerate(prompts)]
    want = tiny_loaded.model.forward(make_forward_batch(dec, CPU, 16), kv32.layers)
    got = bf.model.forward(make_forward_batch(dec, CPU, 16), kv16.layers)
    assert rel(got.float(), want) < 3e-2


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_match_hf(family, tmp_path):
    """Qwen2 (q/k/v biases) and Mistral directories load through the same loader and match HF."""
    import transformers
    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=120)
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**small), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**small, sliding_window=4096), transformers.MistralForCausalLM
    torch.manual_seed(7)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    from server.model.default import build_tokenizer
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loaded = load_model(tmp_path, CPU, torch.float32)
    assert loaded.model.shape.qkv_bias == (family == "qwen2")
    ids = torch.randint(0, 120, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    kv, (t,) = KVCache.for_sequences(loaded.model.shape, [64], CPU, torch.float32)
    ours = loaded.model.forward(make_forward_batch([Segment(t, ids, 0, True)], CPU, 16), kv.layers)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    assert rel(ours[0], ref) < 1e-4
