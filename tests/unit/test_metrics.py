"""server/metrics.py's own logic: vLLM's names carry our values (relabelled, summed where our labels
meet), the token histograms' buckets follow the context, lora_requests_info keeps one bounded series."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from server.adapters.refs import AdapterKey


@pytest.fixture(autouse=True)
def _restore():
    yield
    metrics.configure(False, model_name="", max_context_tokens=metrics.DEFAULT_MAX_CONTEXT, max_lora=0)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_two_five_stops_at_the_limit():
    assert metrics.one_two_five(256) == (1, 2, 5, 10, 20, 50, 100, 200)
    assert metrics.one_two_five(1000)[-1] == 1000
    assert metrics.one_two_five(0) == ()


def test_vllm_names_carry_our_values_with_vllms_labels():
    metrics.configure(False, model_name="m1")
    v = {"model_name": "m1", "engine": "0"}
    stop = sample("vllm:request_success_total", {**v, "finished_reason": "stop"})
    abort = sample("vllm:request_success_total", {**v, "finished_reason": "abort"})
    metrics.FINISHED.labels("eos").inc()
    metrics.FINISHED.labels("stop").inc(2)
    metrics.FINISHED.labels("cancelled").inc()
    assert sample("vllm:request_success_total", {**v, "finished_reason": "stop"}) == stop + 3   # eos + stop
    assert sample("vllm:request_success_total", {**v, "finished_reason": "abort"}) == abort + 1
    count = sample("vllm:inter_token_latency_seconds_count", v)
    metrics.INTER_TOKEN_LATENCY.observe(0.003)
    assert sample("vllm:inter_token_latency_seconds_count", v) == count + 1
    assert sample("vllm:time_per_output_token_seconds_count", v) == count + 1       # vLLM v1's per-token name
    assert sample("lorafleet_inter_token_latency_seconds_count", {}) == sample("vllm:inter_token_latency_seconds_count", v)
    assert sample("lorafleet_server_info", {"model_name": "m1", "version": metrics.version()}) == 1


def test_vllm_names_can_be_switched_off():
    metrics.configure(False, model_name="m1", vllm_names=False)
    text = metrics.exposition()[0].decode()
    assert "lorafleet_e2e_request_latency_seconds_count" in text and "vllm:" not in text
    metrics.configure(False, model_name="m1")
    assert "vllm:e2e_request_latency_seconds_count" in metrics.exposition()[0].decode()


def test_token_histograms_follow_the_context():
    metrics.configure(False, max_context_tokens=100)
    fam = next(f for f in text_string_to_metric_families(metrics.exposition()[0].decode())
               if f.name == "vllm:request_prompt_tokens")
    assert [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")] == \
        ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"]


@dataclass
class _Ref:
    key: AdapterKey


@dataclass
class _Seq:
    adapter: _Ref | None


def _seqs(*keys: tuple[str, str, int]) -> list[_Seq]:
    return [_Seq(_Ref(AdapterKey(*k))) for k in keys]


def lora_series() -> list[dict[str, str]]:
    fam = next(f for f in REGISTRY.collect() if f.name == "lorafleet_lora_requests_info")
    return [s.labels for s in fam.samples]


def test_lora_requests_info_is_one_bounded_series(monkeypatch):
    monkeypatch.setattr(metrics, "LORA_INFO_INTERVAL_S", 0.0)
    metrics.configure(False, max_lora=8)
    running = _seqs(("acme", "b", 1), ("acme", "a", 2), ("shared", "s", 1), ("acme", "a", 2)) + [_Seq(None)]
    metrics.record_load(running, _seqs(("beta", "c", 3)), 0.5)
    assert lora_series() == [{"max_lora": "8", "running_lora_adapters": "other/a@2,other/b@1,shared/s@1",
                              "waiting_lora_adapters": "other/c@3"}]
    many = _seqs(*[("t", f"n{i:02d}", 1) for i in range(metrics.LORA_INFO_MAX_ADAPTERS + 5)])
    metrics.record_load(many, [], 0.5)
    [labels] = lora_series()
    names = labels["running_lora_adapters"].split(",")
    assert len(names) == metrics.LORA_INFO_MAX_ADAPTERS + 1 and names[-1] == "+5"
    metrics.record_load((), (), 0.0)
    assert lora_series() == [{"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}]
