"""Round trips: files written by the real `peft` (and by our bottleneck writer) parse into
AdapterWeights whose numbers reproduce what PEFT itself computes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save

from lorafleet.archive import archive_dir, make_archive
from server.adapters import formats, validate
from server.adapters.weights import AdapterKind
from server.model.shape import LINEAR_MODULES, MODULE_PARENT, BaseModelShape
from server.errors import InvalidArgument
from tests.unit.adapter_fixtures import (BASE, LIMITS, TINY, bottleneck_head, bottleneck_targets, peft_adapter,
                                         peft_archive, split_archive, with_config, with_tensors)


def parse(archive: bytes, **kw):
    return validate.parse_upload(archive, BASE, LIMITS, **kw)


def peft_module(model, layer: int, module: str):
    block = model.get_base_model().model.layers[layer]
    return getattr(getattr(block, MODULE_PARENT[module]), module)


def test_base_shape_from_hf_config():
    from transformers import LlamaConfig

    assert BaseModelShape.from_hf_config(LlamaConfig(**TINY).to_dict()) == BASE
    wide = BaseModelShape.from_hf_config({**TINY, "head_dim": 32})
    assert wide.head_dim == 32 and wide.linear_dims("q_proj") == (64, 128) and wide.linear_dims("o_proj") == (128, 64)
    mha = BaseModelShape.from_hf_config({k: v for k, v in TINY.items() if k != "num_key_value_heads"})
    assert mha.num_kv_heads == 4
    assert [BASE.linear_dims(m) for m in LINEAR_MODULES] == [
        (64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    with pytest.raises(InvalidArgument, match="lm_head"):
        BASE.linear_dims("lm_head")


@pytest.mark.parametrize("variant", ["lora", "lora_rslora", "lora_pattern", "lora_cls"])
def test_lora_delta_equals_peft(variant):
    _, model = peft_adapter(variant)
    w = parse(peft_archive(variant))
    assert w.kind is AdapterKind.LORA and w.ia3 == {} and w.prefix_kv is None
    expected_targets = {(layer, module) for layer in range(BASE.num_layers) for module in LINEAR_MODULES
                        if hasattr(peft_module(model, layer, module), "lora_A")}
    assert set(w.lora) == expected_targets
    torch.manual_seed(3)
    for (layer, module), t in w.lora.items():
        mod = peft_module(model, layer, module)
        x = torch.randn(3, BASE.linear_dims(module)[0])
        with torch.no_grad():
            want = mod(x) - mod.base_layer(x)
        got = (x @ t.A.T @ t.B.T) * t.scale
        assert want.abs().max() > 1e-3  # a real delta, not a zero adapter
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert t.scale == mod.scaling["default"]
    assert w.rank == max(t.A.shape[0] for t in w.lora.values())
    assert w.nbytes == sum(4 * (t.A.numel() + t.B.numel()) for t in w.lora.values()) + (
        4 * w.head.weight.numel() if w.head else 0)


def test_target_dicts_are_in_layer_module_order():
    """Parsing is deterministic whatever order the safetensors file lists its tensors in."""
    for variant in ("lora", "ia3"):
        w = parse(peft_archive(variant))
        keys = list(w.lora or w.ia3)
        assert keys == sorted(keys)


def test_lora_scales_follow_patterns_and_rslora():
    pattern = parse(peft_archive("lora_pattern")).lora
    assert {k: (t.A.shape[0], t.scale) for k, t in pattern.items()} == {
        (0, "q_proj"): (4, 2.0), (1, "q_proj"): (2, 4.0), (0, "down_proj"): (4, 0.75), (1, "down_proj"): (4, 0.75)}
    rs = parse(peft_archive("lora_rslora")).lora
    assert all(t.scale == pytest.approx(16 / math.sqrt(8)) for t in rs.values())


def test_classification_head_from_modules_to_save():
    _, model = peft_adapter("lora_cls")
    w = parse(peft_archive("lora_cls"))
    score = model.get_base_model().score.modules_to_save["default"]
    assert w.head is not None and w.head.bias is None
    torch.testing.assert_close(w.head.weight, score.weight.detach())
    assert w.head.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    named = parse(with_config(peft_archive("lora_cls"), lorafleet={"labels": ["a", "b", "c"]}))
    assert named.head.labels == ("a", "b", "c")


def test_ia3_scales_output_or_input_like_peft():
    _, model = peft_adapter("ia3")
    w = parse(peft_archive("ia3"))
    assert w.kind is AdapterKind.IA3 and w.rank == 0
    assert {m for _, m in w.ia3} == {"k_proj", "v_proj", "down_proj"}
    for (layer, module), t in w.ia3.items():
        assert t.on_input == (module == "down_proj")
        mod = peft_module(model, layer, module)
        x = torch.randn(2, BASE.linear_dims(module)[0])
        with torch.no_grad():
            want = mod(x)
            got = mod.base_layer(x * t.vec) if t.on_input else mod.base_layer(x) * t.vec
            assert (want - mod.base_layer(x)).abs().max() > 1e-3
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["prefix", "prefix_proj"])
def test_prefix_kv_equals_peft_get_prompt(variant):
    _, model = peft_adapter(variant)
    w = parse(peft_archive(variant))
    n = model.peft_config["default"].num_virtual_tokens
    assert w.prefix_kv.shape == (BASE.num_layers, 2, BASE.num_kv_heads, n, BASE.head_dim)
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1)
    for layer in range(BASE.num_layers):
        assert torch.equal(w.prefix_kv[layer, 0], cache.layers[layer].keys[0])
        assert torch.equal(w.prefix_kv[layer, 1], cache.layers[layer].values[0])


def test_prefix_kv_as_cache_reproduces_peft_forward():
    """The base model with prefix_kv pre-filled as its cache (prompt positions start at n_virtual)
    gives PEFT's logits exactly: the keys enter the cache as they are, no RoPE applied."""
    from transformers import DynamicCache

    _, model = peft_adapter("prefix")
    w = parse(peft_archive("prefix"))
    ids = torch.tensor([[5, 6, 7, 8]])
    n = w.prefix_kv.shape[3]
    cache = DynamicCache()
    for layer in range(BASE.num_layers):
        cache.update(w.prefix_kv[layer, 0][None], w.prefix_kv[layer, 1][None], layer)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = model.get_base_model()(input_ids=ids, cache=cache,
                                     attention_mask=torch.ones(1, n + 4, dtype=torch.long)).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want)


def test_prompt_embeds_equal_peft():
    _, model = peft_adapter("prompt")
    w = parse(peft_archive("prompt"))
    assert w.kind is AdapterKind.PROMPT_TUNING and w.prompt_embeds.shape == (6, BASE.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(w.prompt_embeds, model.get_prompt(batch_size=1)[0])
        ids = torch.tensor([[9, 10, 11]])
        want = model(input_ids=ids).logits[:, -3:]
        embeds = torch.cat([w.prompt_embeds[None], model.get_base_model().get_input_embeddings()(ids)], dim=1)
        got = model.get_base_model()(inputs_embeds=embeds).logits[:, -3:]
    torch.testing.assert_close(got, want)


def test_bottleneck_writer_round_trip(tmp_path):
    targets, head = bottleneck_targets(seed=4, size=8, activation="silu"), bottleneck_head()
    formats.write_bottleneck(tmp_path, targets, BASE, head)
    cfg = json.loads((tmp_path / formats.CONFIG_FILE).read_text())
    assert cfg == {"peft_type": "BOTTLENECK", "format_version": 1, "bottleneck_size": 8, "activation": "silu",
                   "placement": ["attn", "mlp"], "base_model_hidden_size": 64, "base_model_num_layers": 2,
                   "lorafleet": {"labels": ["neg", "pos"]}}
    assert "layers.1.mlp_adapter.up.weight" in load((tmp_path / formats.WEIGHTS_FILE).read_bytes())
    w = parse(archive_dir(tmp_path), expected_kind=AdapterKind.BOTTLENECK)
    assert set(w.bottleneck) == set(targets) and w.rank == 8
    for key, t in targets.items():
        got = w.bottleneck[key]
        assert got.activation == "silu"
        for a, b in ((got.down, t.down), (got.down_bias, t.down_bias), (got.up, t.up), (got.up_bias, t.up_bias)):
            assert (a is None and b is None) or torch.equal(a, b)
    assert w.head.labels == ("neg", "pos") and torch.equal(w.head.weight, head.weight)


def test_bottleneck_single_place_subset_of_layers():
    targets = {k: v for k, v in bottleneck_targets(places=("mlp",)).items() if k[0] == 1}
    w = parse(make_archive(*formats.bottleneck_files(targets, BASE)))
    assert set(w.bottleneck) == {(1, "mlp")} and w.config["placement"] == ["mlp"]


def test_bottleneck_writer_rejects_mixed_sizes():
    targets = bottleneck_targets(size=8)
    targets[(0, "attn")] = bottleneck_targets(size=4)[(0, "attn")]
    with pytest.raises(InvalidArgument, match="one size"):
        formats.bottleneck_files(targets, BASE)
    with pytest.raises(InvalidArgument):
        formats.bottleneck_files({}, BASE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_become_float32(dtype):
    archive = with_tensors(peft_archive("lora"), lambda ts: {k: v.to(dtype) for k, v in ts.items()})
    w = parse(archive)
    ref = parse(peft_archive("lora"))
    for key, t in w.lora.items():
        assert t.A.dtype == torch.float32 and t.B.dtype == torch.float32
        torch.testing.assert_close(t.A, ref.lora[key].A, rtol=1e-2, atol=1e-2)


def test_prefix_tensor_layout_by_hand():
    """Independent of PEFT: element [t, ((2*l + kv) * kvh + h) * hd + d] lands at [l, kv, h, t, d]."""
    L, kvh, hd, n = BASE.num_layers, BASE.num_kv_heads, BASE.head_dim, 3
    prompt = torch.arange(n * L * 2 * kvh * hd, dtype=torch.float32).view(n, -1)
    kv = formats.prefix_kv_from_peft(prompt, BASE)
    t, layer, which, h, d = 2, 1, 1, 1, 5
    assert kv[layer, which, h, t, d] == prompt[t, ((2 * layer + which) * kvh + h) * hd + d]


def test_archive_dir_matches_make_archive():
    directory, _ = peft_adapter("prompt")
    cfg, weights = split_archive(archive_dir(directory))
    assert cfg == (directory / formats.CONFIG_FILE).read_bytes()
    assert weights == (directory / formats.WEIGHTS_FILE).read_bytes()
    assert save(load(weights)) is not None


# ---------------------------------------------------------------- DoRA, AdaLoRA, VeRA, LoRA bias (issue 14)

VARIANT_KIND = {"dora": AdapterKind.DORA, "dora_partial": AdapterKind.DORA, "adalora": AdapterKind.ADALORA,
                "vera": AdapterKind.VERA, "lora_bias": AdapterKind.LORA}


def _module_output(w, t, mod, x: torch.Tensor) -> torch.Tensor:
    """What our slots compute for one module: (x W^T + s (x A^T B^T + b)), times g for DoRA."""
    from server.adapters.peft_variants import dora_scale
    W = mod.base_layer.weight.detach()
    y = x @ W.T + t.scale * (x @ t.A.T @ t.B.T + (t.bias if t.bias is not None else 0))
    return y * dora_scale(W, t, "test") if w.kind is AdapterKind.DORA else y


@pytest.mark.parametrize("variant", list(VARIANT_KIND))
def test_variant_module_outputs_equal_peft(variant):
    """Each target of a DoRA / AdaLoRA / VeRA / LoRA-bias file written by peft, folded as we serve it,
    gives PEFT's module output; modules AdaLoRA pruned to rank 0 are absent (no delta)."""
    from tests.unit.adapter_fixtures import variant_adapter, variant_archive
    _, model = variant_adapter(variant)
    w = parse(variant_archive(variant))
    assert w.kind is VARIANT_KIND[variant] and w.lora_bias == (variant == "lora_bias")
    have = {(layer, module) for layer in range(BASE.num_layers) for module in LINEAR_MODULES
            if hasattr(peft_module(model, layer, module), "base_layer")}
    pruned = {(1, "v_proj")} if variant == "adalora" else set()
    assert set(w.lora) == have - pruned and w.rank == max(t.A.shape[0] for t in w.lora.values())
    torch.manual_seed(5)
    for layer, module in sorted(have):
        mod = peft_module(model, layer, module)
        x = torch.randn(3, BASE.linear_dims(module)[0])
        with torch.no_grad():
            want, base = mod(x), mod.base_layer(x)
        assert (want - base).abs().max() > 1e-3 or (layer, module) in pruned
        got = _module_output(w, w.lora[(layer, module)], mod, x) if (layer, module) in w.lora else base
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adalora_ranks_and_scale_follow_masks_and_init_r():
    from tests.unit.adapter_fixtures import ADALORA_MASKS, variant_archive
    w = parse(variant_archive("adalora"))
    assert {k: t.A.shape[0] for k, t in w.lora.items()} == {k: sum(m) for k, m in ADALORA_MASKS.items() if sum(m)}
    assert all(t.scale == pytest.approx(12 / (6 + 1e-5), rel=1e-12) for t in w.lora.values())


def test_vera_folds_shared_projections_per_module_shape():
    from tests.unit.adapter_fixtures import variant_archive
    w = parse(variant_archive("vera"))
    _, tensors = split_archive(variant_archive("vera"))
    shared = load(tensors)
    A, B = shared["base_model.vera_A"], shared["base_model.vera_B"]
    assert A.shape == (8, 128) and B.shape == (128, 8)   # widest d_in (down_proj), widest d_out (up_proj)
    t = w.lora[(0, "q_proj")]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    torch.testing.assert_close(t.A, shared[prefix + "vera_lambda_d"][:, None] * A[:, :64])
    torch.testing.assert_close(t.B, shared[prefix + "vera_lambda_b"][:, None] * B[:64])
    assert t.scale == 1.0 and w.rank == 8
