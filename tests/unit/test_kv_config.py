"""The context and KV budget knobs (issue 22): --max-context-tokens defaults to the model's
max_position_embeddings, --max-prompt-tokens follows it, the KV pool is a byte budget that must hold one
whole context, and --no-prefix-cache turns prefix caching off."""
from __future__ import annotations

import dataclasses

import pytest

from server.config import ServerConfig, config_from_args, resolve_context
from server.engine.kv_cache import KVCache
from server.main import CPU_KV_MAX, build_engine, kv_budget, model_context


def test_the_context_defaults_to_the_models_and_the_prompt_limit_follows():
    cfg = ServerConfig()
    assert cfg.max_context_tokens == 0 and cfg.max_prompt_tokens == 0
    got = resolve_context(cfg, 8192)
    assert (got.max_context_tokens, got.max_prompt_tokens) == (8192, 8192 - cfg.default_new_tokens)
    kept = resolve_context(dataclasses.replace(cfg, max_context_tokens=512, max_prompt_tokens=448), 8192)
    assert (kept.max_context_tokens, kept.max_prompt_tokens) == (512, 448)
    assert resolve_context(dataclasses.replace(cfg, max_context_tokens=1000), 8192).max_prompt_tokens == 936
    with pytest.raises(SystemExit, match="must be below the context of 100"):
        resolve_context(dataclasses.replace(cfg, max_prompt_tokens=100), 100)


def test_model_context_is_max_position_embeddings_or_a_shorter_sliding_window(tiny_loaded):
    assert model_context(tiny_loaded) == 2048
    windowed = dataclasses.replace(tiny_loaded, hf_config={**tiny_loaded.hf_config, "sliding_window": 1024})
    assert model_context(windowed) == 1024
    unused = dataclasses.replace(windowed, hf_config={**windowed.hf_config, "use_sliding_window": False})
    assert model_context(unused) == 2048


def test_cli_knobs():
    cfg = config_from_args(["--kv-cache-bytes", "1048576", "--kv-block-size", "32", "--no-prefix-cache"])
    assert (cfg.kv_cache_bytes, cfg.kv_block_size, cfg.no_prefix_cache) == (1 << 20, 32, True)
    assert config_from_args([]).no_prefix_cache is False
    with pytest.raises(SystemExit):
        config_from_args(["--kv-block-size", "0"])


def test_the_budget_sizes_the_pool_and_must_hold_one_context(tiny_loaded):
    per_block = KVCache.block_bytes(tiny_loaded.model.shape, 16, tiny_loaded.model.dtype)
    assert per_block == 2 * 2 * 2 * 16 * 16 * 4
    cfg = resolve_context(ServerConfig(max_batch_size=4), model_context(tiny_loaded))
    auto = kv_budget(cfg, tiny_loaded)
    assert 0 < auto <= min(CPU_KV_MAX, 2 * 4 * 2048 * per_block // 16)
    engine = build_engine(dataclasses.replace(cfg, kv_cache_bytes=300 * per_block), tiny_loaded, None)
    assert engine.kv.blocks.capacity == 300 and engine.kv.nbytes == 300 * per_block
    assert engine.kv.blocks.prefix_cache
    off = build_engine(dataclasses.replace(cfg, kv_cache_bytes=300 * per_block, no_prefix_cache=True), tiny_loaded,
                       None)
    assert not off.kv.blocks.prefix_cache
    with pytest.raises(SystemExit, match="cannot hold one sequence of the 2048-token context"):
        build_engine(dataclasses.replace(cfg, kv_cache_bytes=100 * per_block), tiny_loaded, None)
