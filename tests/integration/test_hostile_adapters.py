"""Issue 20, finding 2: uploaded adapters with finite but huge values. Each used to pass validation
and crash the engine on its first (sampled, or for lora_alpha 1e300 any) request, for every tenant,
and again after every restart. Now: refused at upload (value and gain bounds); one that slips past
the bounds is caught by the first-load probe, refused with FAILED_PRECONDITION naming it and
quarantined on disk; a store holding such a version quarantines it at the next start. Another
tenant's request in flight meanwhile gets exactly its solo tokens."""
from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from client import LoraFleetClient
from server.api.auth import create_key
from server.main import BackgroundServer
from tests.integration.conftest import code_of, make_config
from tests.serving_fixtures import make_adapter

CANARY = "the canary says"


def _scaled(src, dst, value: float, **config):
    """A copy of a PEFT LoRA directory with every lora_A / lora_B value set to `value`."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.full_like(v, value) for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture()
def two_tenants(tmp_path):
    keys = tmp_path / "keys.json"
    return keys, create_key(keys, "mallory", False), create_key(keys, "alice", False)


def test_huge_values_refused_at_upload(tiny_loaded, tiny_model_dir, tmp_path, two_tenants):
    keys, bad_key, good_key = two_tenants
    d, _ = make_adapter(tiny_model_dir, tmp_path / "peft", "lora", seed=3)
    hostile = {"a-b-1e19": _scaled(d, tmp_path / "h1", 1e19), "alpha-1e300": _scaled(d, tmp_path / "h2", 0.01,
                                                                                     lora_alpha=1e300)}
    with BackgroundServer(make_config(tmp_path, api_keys=keys), tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=bad_key, timeout=60) as bad, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=good_key, timeout=60) as good:
        want = good.generate(CANARY, max_new_tokens=8, ignore_eos=True).token_ids
        for name, path in hostile.items():
            with pytest.raises(grpc.RpcError) as e:
                bad.upload_adapter(path, name)
            assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "accepts" in e.value.details()
        assert bad.list_adapters() == []
        assert good.generate(CANARY, max_new_tokens=8, ignore_eos=True).token_ids == want


def test_overflowing_adapter_is_quarantined_at_first_load(tiny_loaded, tiny_model_dir, tmp_path, two_tenants):
    """With the bounds lifted (--adapter-max-value 1e38) a LoRA of values 1e15 is stored; its first
    request, greedy, overflows in the probe: FAILED_PRECONDITION naming it, no longer listed, moved
    to quarantine/, and the next start does not serve it either. The engine never restarts."""
    keys, bad_key, good_key = two_tenants
    d, _ = make_adapter(tiny_model_dir, tmp_path / "peft", "lora", seed=4)
    boom = _scaled(d, tmp_path / "boom", 1e15)
    cfg = make_config(tmp_path, api_keys=keys, adapter_max_value=1e38)
    with BackgroundServer(cfg, tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=bad_key, timeout=60) as bad, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=good_key, timeout=60) as good:
        want = good.generate(CANARY, max_new_tokens=16, ignore_eos=True).token_ids
        bad.upload_adapter(boom, "boom")
        got = {}
        canary = threading.Thread(target=lambda: got.update(
            r=good.generate(CANARY, max_new_tokens=16, ignore_eos=True)))
        canary.start()
        with pytest.raises(grpc.RpcError) as e:
            bad.generate("hello", adapter="boom", max_new_tokens=4)
        canary.join(60)
        assert code_of(e) == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "'boom'" in e.value.details() and "quarantined" in e.value.details()
        assert got["r"].token_ids == want
        assert bad.list_adapters() == []
        with pytest.raises(grpc.RpcError) as e:
            bad.generate("hello", adapter="boom", max_new_tokens=4)
        assert code_of(e) == grpc.StatusCode.NOT_FOUND
        assert srv.engine.alive and srv.engine.restarts == 0
    assert any((tmp_path / "data" / "quarantine").iterdir())
    with BackgroundServer(cfg, tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=bad_key, timeout=60) as bad:
        assert bad.list_adapters() == []


def test_stored_version_over_the_bounds_is_quarantined_at_start(tiny_loaded, tiny_model_dir, tmp_path,
                                                                  two_tenants):
    """A version stored under looser bounds (or before they existed) never reaches the engine."""
    keys, bad_key, _ = two_tenants
    d, _ = make_adapter(tiny_model_dir, tmp_path / "peft", "lora", seed=5)
    loose = make_config(tmp_path, api_keys=keys, adapter_max_value=1e38)
    with BackgroundServer(loose, tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=bad_key, timeout=60) as bad:
        bad.upload_adapter(_scaled(d, tmp_path / "big", 1e15), "big")
        bad.upload_adapter(d, "fine")
    with BackgroundServer(make_config(tmp_path, api_keys=keys), tiny_loaded) as srv, \
            LoraFleetClient(f"127.0.0.1:{srv.port}", api_key=bad_key, timeout=60) as bad:
        assert [a.name for a in bad.list_adapters()] == ["fine"]
        assert bad.generate("hello", adapter="fine", max_new_tokens=2).completion_tokens >= 1
