"""Mixed-adapter serving: every row of a mixed batch equals its solo run and PEFT's forward.

The oracle for PEFT-format adapters is PEFT's own forward pass over the whole sequence at every
step; for bottleneck adapters, the HF base with forward hooks. Every adapter changes the output.
"""
from __future__ import annotations

import threading

import pytest
import torch

from server.adapters.refs import parse_tenant_ref
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from tests.serving_fixtures import (ALL_KINDS, KINDS, hf_base, make_adapter, make_cls_adapter, oracle_greedy,
                                    oracle_logits_along, serving, upload)

N_NEW = 6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("peft-adapters")


class Run:
    def __init__(self, seq: Sequence):
        self.seq, self.tokens, self.done, self.final = seq, [], threading.Event(), None
        self.logprobs = []
        seq.logits_trace = []
        seq.sink = self

    def __call__(self, ev):
        self.tokens.extend(ev.token_ids)
        self.logprobs.extend(ev.logprobs)
        if isinstance(ev, FinishEvent):
            self.final = ev
            self.done.set()


def start_engine(tiny_loaded, root, num_slots=8, max_batch=32):
    registry, adapters = serving(tiny_loaded, root, num_slots=num_slots, max_rank=16)
    eng = Engine(tiny_loaded, max_batch_size=max_batch, max_context_tokens=96, max_queued=512,
                 max_prefill_tokens=512, adapters=adapters)
    eng.start()
    return registry, eng


def submit(eng, registry, tenant, name, prompt, n=N_NEW, classify=False, **params) -> Run:
    ref = registry.resolve(parse_tenant_ref(tenant, name)) if name else None
    seq = Sequence("r", list(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True, **params), None,
                   tenant=tenant, classify=classify)
    run = Run(seq)
    eng.submit(seq, ref)
    return run


def wait(runs):
    for r in runs:
        assert r.done.wait(60), "request did not finish"
        assert r.final.reason != FinishReason.ERROR, r.final.error
    return runs


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 259, (3 + (5 * i) % 17,), generator=g).tolist() for i in range(k)]


@pytest.fixture(scope="module")
def mixed(tiny_loaded, tiny_model_dir, out_root, tmp_path_factory):
    """One engine with one adapter of every kind uploaded for tenant 't'."""
    registry, eng = start_engine(tiny_loaded, tmp_path_factory.mktemp("store"), num_slots=len(ALL_KINDS))
    oracles = {}
    for i, kind in enumerate(ALL_KINDS):
        d, model = make_adapter(tiny_model_dir, out_root, kind, seed=i + 1)
        upload(registry, "t", kind.replace("_", "-"), d)
        oracles[kind] = model
    yield registry, eng, oracles
    eng.stop()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_kind_matches_peft_and_changes_output(mixed, tiny_model_dir, kind):
    registry, eng, oracles = mixed
    prompt = prompts(1, seed=3)[0]
    ours = wait([submit(eng, registry, "t", kind.replace("_", "-"), prompt)])[0]
    base = wait([submit(eng, registry, "t", None, prompt)])[0]
    ref_logits, ref_tokens = oracle_greedy(oracles[kind], prompt, N_NEW)
    assert rel(ours.seq.logits_trace[0], ref_logits) < 1e-4
    assert ours.tokens == ref_tokens
    assert rel(ours.seq.logits_trace[0], base.seq.logits_trace[0]) > 1e-2, "adapter must change the output"
    if kind == "prefix":
        assert ours.final.virtual_tokens > 0 and ours.final.prompt_tokens == len(prompt)
    if kind == "prompt":
        assert ours.final.virtual_tokens > 0 and ours.final.prompt_tokens == len(prompt)


@pytest.mark.parametrize("kind", ALL_KINDS + (None,))
def test_logprobs_equal_log_softmax_of_peft_logits_for_each_kind(mixed, tiny_model_dir, kind):
    """Issue 23: logprobs are log_softmax of the model's own logits (PEFT's forward here, the HF base
    for no adapter) at every step, also for a sampled row whose penalties and bias change the draw."""
    registry, eng, oracles = mixed
    prompt = prompts(1, seed=29)[0]
    name = kind.replace("_", "-") if kind else None
    run = wait([submit(eng, registry, "t", name, prompt, temperature=1.3, seed=5, presence_penalty=1.0,
                       frequency_penalty=0.5, logit_bias=((40, 3.0),), logprobs=5)])[0]
    oracle = oracles[kind] if kind else hf_base(tiny_model_dir)
    ref = oracle_logits_along(oracle, prompt, run.tokens).log_softmax(-1)
    assert len(run.logprobs) == len(run.tokens) == N_NEW
    for step, (tok, lp) in enumerate(zip(run.tokens, run.logprobs)):
        assert lp.token == tok
        assert abs(lp.logprob - ref[step, tok].item()) < 1e-4, (kind, step)
        top = ref[step].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist(), (kind, step)
        assert torch.allclose(torch.tensor([v for _, v in lp.top]), top.values, atol=1e-4)


def test_mixed_batch_of_all_kinds_equals_solo_and_peft(mixed):
    registry, eng, oracles = mixed
    ps = prompts(len(ALL_KINDS) + 1, seed=5)
    names = [k.replace("_", "-") for k in ALL_KINDS] + [None]
    solo = [wait([submit(eng, registry, "t", n, p)])[0] for n, p in zip(names, ps)]
    together = wait([submit(eng, registry, "t", n, p) for n, p in zip(names, ps)])
    for kind, s, t, p in zip(list(ALL_KINDS) + [None], solo, together, ps):
        assert t.tokens == s.tokens
        assert rel(t.seq.logits_trace[0], s.seq.logits_trace[0]) < 1e-5
        if kind:
            ref_logits, ref_tokens = oracle_greedy(oracles[kind], p, N_NEW)
            assert t.tokens == ref_tokens
            assert rel(t.seq.logits_trace[0], ref_logits) < 1e-4


def test_rows_join_and_leave_mid_batch(mixed):
    registry, eng, _ = mixed
    ps = prompts(12, seed=9)
    names = [[k.replace("_", "-") for k in ALL_KINDS][i % len(ALL_KINDS)] if i % 4 else None for i in range(12)]
    lens = [2 + (3 * i) % 9 for i in range(12)]
    solo = [wait([submit(eng, registry, "t", n, p, k)])[0] for n, p, k in zip(names, ps, lens)]
    first = [submit(eng, registry, "t", n, p, k) for n, p, k in list(zip(names, ps, lens))[:6]]
    first[0].done.wait(30)                     # some rows are mid-decode when the rest join
    second = [submit(eng, registry, "t", n, p, k) for n, p, k in list(zip(names, ps, lens))[6:]]
    for s, t in zip(solo, wait(first + second)):
        assert t.tokens == s.tokens


def test_32_rows_over_32_adapters_of_every_kind(tiny_loaded, tiny_model_dir, out_root, tmp_path):
    """All nine kinds (LoRA twice: plain and rsLoRA) over 32 distinct adapters in one batch."""
    registry, eng = start_engine(tiny_loaded, tmp_path / "store", num_slots=32)
    try:
        names, oracles = [], []
        for i in range(32):
            kind = ALL_KINDS[i % len(ALL_KINDS)]
            d, model = make_adapter(tiny_model_dir, out_root, kind, seed=100 + i)
            upload(registry, f"tenant{i % 4}", f"a{i}", d)
            names.append((f"tenant{i % 4}", f"a{i}"))
            oracles.append(model)
        ps = prompts(32, seed=11)
        together = wait([submit(eng, registry, t, n, p) for (t, n), p in zip(names, ps)])
        solo = [wait([submit(eng, registry, t, n, p)])[0] for (t, n), p in zip(names, ps)]
        for i, (s, t) in enumerate(zip(solo, together)):
            kind = ALL_KINDS[i % len(ALL_KINDS)]
            assert t.tokens == s.tokens, f"row {i} ({kind}) differs from its solo run"
            assert rel(t.seq.logits_trace[0], s.seq.logits_trace[0]) < 1e-5, f"row {i} ({kind})"
            ref_logits, ref_tokens = oracle_greedy(oracles[i], ps[i], N_NEW)
            assert t.tokens == ref_tokens, f"row {i} ({kind}) differs from the oracle"
            assert rel(t.seq.logits_trace[0], ref_logits) < 1e-4, f"row {i} ({kind})"
    finally:
        eng.stop()


def test_few_slots_many_adapters_evicts_and_stays_exact(tiny_loaded, tiny_model_dir, out_root, tmp_path):
    """2 device slots, 6 adapters in flight: requests wait for a slot, LRU evicts, outputs exact."""
    registry, eng = start_engine(tiny_loaded, tmp_path / "store", num_slots=2)
    try:
        for i, kind in enumerate(KINDS):
            upload(registry, "t", f"k{i}", make_adapter(tiny_model_dir, out_root, kind, seed=i + 1)[0])
        ps = prompts(len(KINDS), seed=13)
        together = wait([submit(eng, registry, "t", f"k{i}", p) for i, p in enumerate(ps)])
        for i, (kind, t) in enumerate(zip(KINDS, together)):
            _, model = make_adapter(tiny_model_dir, out_root, kind, seed=i + 1)
            assert t.tokens == oracle_greedy(model, ps[i], N_NEW)[1]
        stats = eng.adapters.cache.stats()
        assert stats.device.evictions >= len(KINDS) - 2
    finally:
        eng.stop()


def test_classification_matches_peft_and_shares_batches(mixed, tiny_model_dir, out_root):
    registry, eng, _ = mixed
    d, model = make_cls_adapter(tiny_model_dir, out_root, seed=7)
    upload(registry, "t", "cls", d)
    ps = prompts(4, seed=17)
    gens = [submit(eng, registry, "t", "lora", p) for p in ps]
    clss = [submit(eng, registry, "t", "cls", p, n=0, classify=True) for p in ps]
    wait(gens + clss)
    for p, c in zip(ps, clss):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([p])).logits[0].softmax(-1)
        got = torch.tensor(c.final.probabilities)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
        assert c.final.prompt_tokens == len(p)
    solo = [wait([submit(eng, registry, "t", "lora", p)])[0] for p in ps]
    assert [g.tokens for g in gens] == [s.tokens for s in solo]


def test_classify_without_head_fails_cleanly(mixed):
    registry, eng, _ = mixed
    run = submit(eng, registry, "t", "lora", prompts(1)[0], n=0, classify=True)
    assert run.done.wait(30)
    assert run.final.reason == FinishReason.ERROR and "classification head" in str(run.final.error)


def _cancelling_dora(src, dst, base_dir):
    """A copy of a DoRA adapter whose layer-0 q_proj delta cancels row 5 of the base weight:
    ||W + s B A||_5 = 0, so PEFT's m / norm would divide by zero."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    W = load_file(str(next(base_dir.glob("*.safetensors"))))["model.layers.0.self_attn.q_proj.weight"]
    ts = load_file(str(dst / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0.self_attn.q_proj."
    A, B = ts[p + "lora_A.weight"].clone(), ts[p + "lora_B.weight"].clone()
    A[0], B[5] = W[5], 0.0
    B[5, 0] = -1.0 / s
    ts[p + "lora_A.weight"], ts[p + "lora_B.weight"] = A, B
    save_file(ts, str(dst / "adapter_model.safetensors"))
    return dst


def test_dora_whose_norm_vanishes_fails_its_request_only(mixed, tiny_model_dir, out_root, tmp_path):
    """The norm needs the base weight, which upload validation does not hold: such an adapter is refused
    with FailedPrecondition when it is loaded into a slot; rows in the same batch are unaffected."""
    from server.errors import FailedPrecondition
    registry, eng, _ = mixed
    src, _ = make_adapter(tiny_model_dir, out_root, "dora", seed=2)   # even seed: DoRA on every linear
    upload(registry, "t", "dora-zero", _cancelling_dora(src, tmp_path / "dz", tiny_model_dir))
    ps = prompts(3, seed=21)
    runs = [submit(eng, registry, "t", n, p) for n, p in zip(["dora-zero", "dora", None], ps)]
    for r in runs:
        assert r.done.wait(60)
    bad = runs[0].final
    assert bad.reason == FinishReason.ERROR and isinstance(bad.error, FailedPrecondition)
    assert "vanishes" in str(bad.error) and "layer 0 q_proj" in str(bad.error)
    solo = [wait([submit(eng, registry, "t", n, p)])[0] for n, p in zip(["dora", None], ps[1:])]
    assert [r.tokens for r in wait(runs[1:])] == [s.tokens for s in solo]


def test_trainer_dora_export_is_served_unchanged(mixed, tiny_model_dir, tmp_path):
    """`lorafleet train --method dora`: a few steps on the tiny model, exported in PEFT's format, parsed as
    DORA and served exactly as PEFT runs the exported files."""
    import json

    from peft import PeftModel

    from server.adapters.weights import AdapterKind
    from tests.serving_fixtures import hf_base
    from tests.unit.trainer_fixtures import config, lm_files
    from trainer.loop import train
    registry, eng, _ = mixed
    result = train(config(tiny_model_dir, tmp_path / "out", *lm_files(tmp_path / "data"), method="dora",
                          max_steps=8, lr=1e-2, rank=4))
    cfg = json.loads((result.out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    info = upload(registry, "t", "trained-dora", result.out)
    assert info.kind is AdapterKind.DORA
    oracle = PeftModel.from_pretrained(hf_base(tiny_model_dir), str(result.out)).eval()
    prompt = prompts(1, seed=23)[0]
    ours, base = wait([submit(eng, registry, "t", "trained-dora", prompt), submit(eng, registry, "t", None, prompt)])
    ref_logits, ref_tokens = oracle_greedy(oracle, prompt, N_NEW)
    assert rel(ours.seq.logits_trace[0], ref_logits) < 1e-4 and ours.tokens == ref_tokens
    assert rel(ours.seq.logits_trace[0], base.seq.logits_trace[0]) > 1e-3, "training must change the output"


def test_every_kind_across_block_boundaries_with_chunked_prefill(tiny_loaded, tiny_model_dir, out_root, tmp_path):
    """Issue 22: KV blocks of 4 tokens, prefill chunks of 5 (they end inside and on block
    boundaries), prompts of block size - 1, block size, block size + 1 and two blocks + 1 (virtual
    tokens shift them further): every kind, alone and in one mixed batch with base rows, equals
    PEFT's forward token for token (first logits within the parity tolerance), prefix cache on."""
    registry, adapters = serving(tiny_loaded, tmp_path / "store", num_slots=len(ALL_KINDS), max_rank=16)
    eng = Engine(tiny_loaded, max_batch_size=32, max_context_tokens=96, max_queued=512, max_prefill_tokens=5,
                 decode_prefill_tokens=5, adapters=adapters, kv_block_size=4)
    eng.start()
    try:
        oracles = {}
        for i, kind in enumerate(ALL_KINDS):
            d, model = make_adapter(tiny_model_dir, out_root, kind, seed=i + 1)
            upload(registry, "t", kind.replace("_", "-"), d)
            oracles[kind] = model
        g = torch.Generator().manual_seed(31)
        lengths = (3, 4, 5, 9)
        cases = [(kind, [1] + torch.randint(3, 259, (n - 1,), generator=g).tolist())
                 for kind in (*ALL_KINDS, None) for n in lengths]
        solo = [wait([submit(eng, registry, "t", k and k.replace("_", "-"), p)])[0] for k, p in cases]
        together = wait([submit(eng, registry, "t", k and k.replace("_", "-"), p) for k, p in cases])
        for (kind, p), s, t in zip(cases, solo, together):
            assert t.tokens == s.tokens, (kind, len(p))
            if kind is not None:
                ref_logits, ref_tokens = oracle_greedy(oracles[kind], p, N_NEW)
                assert s.tokens == ref_tokens, (kind, len(p))
                assert rel(s.seq.logits_trace[0], ref_logits) < 1e-4, (kind, len(p))
                assert rel(t.seq.logits_trace[0], ref_logits) < 1e-4, (kind, len(p))
        assert eng.kv.blocks.num_used == 0 or eng.scheduler.has_work()
    finally:
        eng.stop()
