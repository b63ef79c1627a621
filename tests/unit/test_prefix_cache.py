"""Prefix caching and preemption through the engine (issue 22), on the tiny model with real PEFT adapters.

Every scenario runs the same requests, in the same order, on two engines that differ only in
`prefix_cache`: every output must be the same token for token (and its first logits within float
noise), while the cache-on engine really hits where a hit is allowed (a tenant's own prompt under the
same adapter version) and never where it is not (another tenant, another adapter, another version).
Preemption: a pool too small for the load preempts and recomputes, and every request still ends
with exactly the tokens of a run with room for all; the blocks and gauges return to zero.
"""
from __future__ import annotations

import threading

import pytest
import torch

from server import metrics
from server.adapters.refs import parse_tenant_ref
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishEvent, FinishReason, Sequence
from server.errors import ResourceExhausted
from tests.serving_fixtures import make_adapter, serving, upload

BS = 4                       # a small block: many block boundaries in short prompts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class Run:
    def __init__(self, seq: Sequence):
        self.seq, self.tokens, self.done, self.final = seq, [], threading.Event(), None
        seq.logits_trace = []
        seq.sink = self

    def __call__(self, ev):
        self.tokens.extend(ev.token_ids)
        if isinstance(ev, FinishEvent):
            self.final = ev
            self.done.set()

    def wait(self) -> "Run":
        assert self.done.wait(60), "request did not finish"
        assert self.final.reason is not FinishReason.ERROR, self.final.error
        return self


class Rig:
    """One engine over its own adapter store."""

    def __init__(self, tiny_loaded, root, prefix_cache: bool, **kw):
        self.registry, adapters = serving(tiny_loaded, root, num_slots=8)
        kw = {"max_batch_size": 8, "max_context_tokens": 256, "max_queued": 256, "max_prefill_tokens": 24,
              "kv_block_size": BS, **kw}
        self.engine = Engine(tiny_loaded, adapters=adapters, prefix_cache=prefix_cache, **kw)
        self.engine.start()

    def submit(self, tenant: str, adapter: str | None, prompt: list[int], n: int = 5) -> Run:
        ref = self.registry.resolve(parse_tenant_ref(tenant, adapter)) if adapter else None
        seq = Sequence("r", list(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True), None, tenant=tenant)
        run = Run(seq)
        self.engine.submit(seq, ref)
        return run

    def stop(self) -> None:
        self.engine.stop()


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pc-adapters")


@pytest.fixture()
def rigs(tiny_loaded, tiny_model_dir, adapters_dir, tmp_path):
    on, off = Rig(tiny_loaded, tmp_path / "on", True), Rig(tiny_loaded, tmp_path / "off", False)
    for rig in (on, off):
        for tenant in ("a", "b"):
            for name, kind, seed in (("lora", "lora", 1), ("lora2", "lora", 2), ("prefix", "prefix", 3),
                                     ("prompt", "prompt", 4), ("ia3", "ia3", 5)):
                upload(rig.registry, tenant, name, make_adapter(tiny_model_dir, adapters_dir, kind, seed)[0])
    yield on, off
    on.stop()
    off.stop()


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = [1] + ids(0, 37)             # a "system prompt" of 38 tokens: 9 full blocks and 2 tokens


def both(rigs, requests: list[tuple[str, str | None, list[int]]], n: int = 5) -> list[tuple[Run, Run]]:
    """Submit the requests together on each engine; wait; the (on, off) pairs, compared."""
    on, off = rigs
    pairs = list(zip([on.submit(t, a, p, n) for t, a, p in requests], [off.submit(t, a, p, n) for t, a, p in requests]))
    for r_on, r_off in pairs:
        r_on.wait()
        r_off.wait()
        assert r_on.tokens == r_off.tokens, (r_on.seq.tenant, r_on.seq.cached_tokens)
        assert rel(r_on.seq.logits_trace[0], r_off.seq.logits_trace[0]) < 1e-5
        assert r_off.seq.cached_tokens == 0
    return pairs


def test_shared_system_prompt(rigs):
    first = both(rigs, [("a", None, SYSTEM + ids(1, 5))])
    assert first[0][0].seq.cached_tokens == 0
    later = both(rigs, [("a", None, SYSTEM + ids(s, 3 + s)) for s in range(2, 6)] + [("a", None, SYSTEM)])
    for r_on, _ in later:
        assert r_on.seq.cached_tokens == 36, r_on.seq.cached_tokens      # the system prompt's 9 full blocks
    lora = both(rigs, [("a", "lora", SYSTEM + ids(s, 4)) for s in range(6, 9)])
    assert [r.seq.cached_tokens for r, _ in lora] == [0, 0, 0]            # computed together: none cached yet
    again = both(rigs, [("a", "lora", SYSTEM + ids(9, 4))])
    assert again[0][0].seq.cached_tokens >= 36


@pytest.mark.parametrize("adapter", [None, "lora", "prefix", "prompt", "ia3"])
def test_multi_turn_chat(rigs, adapter):
    """Each turn re-sends the whole history (the previous answer included): from turn 2 on, the
    history's full blocks, prompt and generated tokens alike, come from the cache."""
    history = list(SYSTEM)
    for turn in range(4):
        history += ids(20 + turn, 6)
        (r_on, _), = both(rigs, [("b", adapter, history)], n=6)
        if turn:
            assert r_on.seq.cached_tokens >= len(history) - 6 - BS - r_on.seq.kv_offset, (turn, r_on.seq.cached_tokens)
        history += r_on.tokens


def test_the_same_prompt_under_two_adapters_never_shares(rigs):
    prompt = SYSTEM + ids(30, 9)
    base = both(rigs, [("a", None, prompt)])
    one = both(rigs, [("a", "lora", prompt)])
    two = both(rigs, [("a", "lora2", prompt)])
    assert one[0][0].seq.cached_tokens == two[0][0].seq.cached_tokens == 0
    assert one[0][0].tokens != base[0][0].tokens or two[0][0].tokens != base[0][0].tokens
    assert both(rigs, [("a", "lora2", prompt)])[0][0].seq.cached_tokens > 0     # its own blocks: a hit


def test_a_hot_swapped_version_never_hits_the_old_ones(rigs, tiny_model_dir, adapters_dir):
    on, off = rigs
    prompt = SYSTEM + ids(40, 5)
    (r1, _), = both(rigs, [("a", "lora", prompt)])
    assert r1.seq.cached_tokens == 0
    for rig in rigs:                                      # v2 of "lora": other weights, same name
        info = upload(rig.registry, "a", "lora", make_adapter(tiny_model_dir, adapters_dir, "lora", 11)[0])
        assert info.version == 2
    (r2, _), = both(rigs, [("a", "lora", prompt)])
    assert r2.seq.cached_tokens == 0                      # v1's blocks are another namespace
    assert r2.tokens != r1.tokens
    assert both(rigs, [("a", "lora", prompt)])[0][0].seq.cached_tokens > 0     # v2's own blocks


def test_two_tenants_sending_the_same_text_never_share(rigs):
    prompt = SYSTEM + ids(50, 7)
    for adapter in (None, "lora", "prefix"):
        (ra, _), = both(rigs, [("a", adapter, prompt)])
        (rb, _), = both(rigs, [("b", adapter, prompt)])
        assert rb.seq.cached_tokens == 0, adapter
        (ra2, _), = both(rigs, [("a", adapter, prompt)])
        assert ra2.seq.cached_tokens > 0 and ra2.tokens == ra.tokens
    on = rigs[0].engine.kv.blocks
    assert all(space[0] in ("a", "b") for space in on._index)


def test_virtual_tokens_are_part_of_the_chain(rigs):
    """A prefix-tuned and a prompt-tuned row with the base model's text: their blocks (holding the
    adapters' virtual K/V) are never served to the base row or to each other."""
    prompt = SYSTEM + ids(60, 3)
    both(rigs, [("a", "prefix", prompt), ("a", "prompt", prompt)])
    (base, _), = both(rigs, [("a", None, prompt)])
    assert base.seq.cached_tokens == 0
    (pre, _), (pro, _) = both(rigs, [("a", "prefix", prompt), ("a", "prompt", prompt)])
    assert pre.seq.cached_tokens > pre.seq.kv_offset and pro.seq.cached_tokens > pro.seq.virtual_tokens
    assert pre.final.virtual_tokens == pre.seq.kv_offset > 0


# ---------------------------------------------------------------- preemption

def _load(rig: Rig, n: int, seed: int, adapters=(None,)) -> list[Run]:
    return [rig.submit("a" if i % 3 else "b", adapters[i % len(adapters)], ids(seed + i, 6 + i % 5), 30)
            for i in range(n)]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_under_a_small_pool_completes_every_request_exactly(tiny_loaded, tiny_model_dir, adapters_dir,
                                                                        tmp_path, prefix_cache):
    """6 requests of ~40 positions (10 blocks) each; the pool holds 24 blocks: decoding runs out of
    blocks, sequences are preempted and recomputed, and every one ends with exactly the tokens of a
    pool with room for all. Nothing is lost; the blocks and the gauges return to zero."""
    small = Rig(tiny_loaded, tmp_path / "small", prefix_cache, kv_blocks=25)
    big = Rig(tiny_loaded, tmp_path / "big", prefix_cache)
    try:
        for rig in (small, big):
            upload(rig.registry, "a", "prefix", make_adapter(tiny_model_dir, adapters_dir, "prefix", 3)[0])
            upload(rig.registry, "b", "prefix", make_adapter(tiny_model_dir, adapters_dir, "prefix", 3)[0])
        kinds = (None, "prefix")
        want = [r.wait().tokens for r in _load(big, 6, 70, kinds)]
        got = [r.wait() for r in _load(small, 6, 70, kinds)]
        assert [r.tokens for r in got] == want
        assert all(len(t) == 30 for t in want)
        assert sum(small.engine.scheduler.preemptions.values()) > 0
        assert sum(big.engine.scheduler.preemptions.values()) == 0
        eng = small.engine
        assert _idle(eng)
        blocks = eng.kv.blocks
        assert blocks.num_used == 0 and blocks.num_used + blocks.num_cached + blocks.num_free == blocks.capacity
        assert metrics.KV_BLOCKS.labels("used")._value.get() == 0
        assert metrics.RUNNING._value.get() == 0 and metrics.WAITING._value.get() == 0
        assert metrics.PREEMPTIONS.labels("other")._value.get() > 0
    finally:
        small.stop()
        big.stop()


def _idle(engine: Engine) -> bool:
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not engine.scheduler.has_work() and engine.kv.blocks.num_used == 0:
            time.sleep(0.05)                   # one more loop iteration: the gauges are set after it
            return True
        time.sleep(0.01)
    return False


def test_a_request_larger_than_the_pool_fails_at_once_and_one_that_fills_it_is_served(tiny_loaded, tiny_model_dir,
                                                                                     adapters_dir, tmp_path):
    rig = Rig(tiny_loaded, tmp_path / "s", True, kv_blocks=11)        # 10 blocks: 40 tokens
    try:
        upload(rig.registry, "a", "prefix", make_adapter(tiny_model_dir, adapters_dir, "prefix", 3)[0])
        virtual = rig.submit("a", "prefix", ids(79, 20), 16)          # 36 positions + 6 prefix-tuning ones
        assert virtual.done.wait(30)
        assert virtual.final.reason is FinishReason.ERROR and isinstance(virtual.final.error, ResourceExhausted)
        assert "virtual tokens included" in str(virtual.final.error)
        too_big = rig.submit("a", None, ids(80, 20), 21)             # 41 positions
        assert too_big.done.wait(30)
        assert too_big.final.reason is FinishReason.ERROR and isinstance(too_big.final.error, ResourceExhausted)
        assert "holds 40 tokens" in str(too_big.final.error)
        fits = rig.submit("a", None, ids(80, 20), 20).wait()          # exactly 40: the whole pool
        assert len(fits.tokens) == 20
        crowd = [rig.submit("a", None, ids(81 + i, 20), 20) for i in range(3)]   # one at a time, preempting
        assert all(len(r.wait().tokens) == 20 for r in crowd)
        assert _idle(rig.engine)
    finally:
        rig.stop()


def test_a_failing_row_rerun_in_halves_leaks_no_block(tiny_loaded, tmp_path, monkeypatch):
    """A forward that raises for one row (its poison token sits in its third prefill chunk, after two
    chunks whose full blocks were cached) is re-run in halves: the row fails alone, its batch mates
    end with their solo tokens, and afterwards every reference count is zero (nothing allocated twice,
    nothing leaked) and none of the failed row's blocks stays in the prefix cache."""
    poison = 77
    rig = Rig(tiny_loaded, tmp_path / "f", True, max_prefill_tokens=4, decode_prefill_tokens=4)
    try:
        prompts = [SYSTEM[:10] + ids(90 + i, 5) for i in range(5)]
        want = [rig.submit("a", None, p, 8).wait().tokens for p in prompts]
        real = rig.engine.model.forward

        def poisoned(batch, *a, **kw):
            if bool((batch.input_ids == poison).any()):
                raise RuntimeError("a kernel fault triggered by one row")
            return real(batch, *a, **kw)

        monkeypatch.setattr(rig.engine.model, "forward", poisoned)
        bad_prompt = ids(99, 9) + [poison] + ids(98, 4)
        runs = [rig.submit("a", None, p, 8) for p in prompts[:3]] + [rig.submit("a", None, bad_prompt, 8)] + \
               [rig.submit("a", None, p, 8) for p in prompts[3:]]
        bad = runs.pop(3)
        assert bad.done.wait(30) and bad.final.reason is FinishReason.ERROR
        assert [r.wait().tokens for r in runs] == want
        assert _idle(rig.engine)
        blocks = rig.engine.kv.blocks
        assert all(r == 0 for r in blocks._ref) and blocks.num_free + blocks.num_cached == blocks.capacity
        bad_space = blocks._index.get(("a", None), {})
        assert blocks.match(("a", None), bad.seq.hash_tokens(0, 8), 2) == ([], [])
        assert len(bad_space) > 0                                   # the mates' blocks are still cached
    finally:
        rig.stop()


def choices(rig: Rig, prompt: list[int], n: int, cancel_first: bool = False) -> list[Run]:
    """n seeded choices of one prompt, as Generation submits them: each later one led by the first."""
    runs: list[Run] = []
    for i in range(n):
        params = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=7 + i)
        seq = Sequence("n", list(prompt), params, None, tenant="a", leader=runs[0].seq if runs else None)
        runs.append(Run(seq))
        if cancel_first and i == 0:
            seq.cancel()
        rig.engine.submit(seq, None)
    return runs


def test_n_choices_share_one_prefill(rigs):
    """Issue 23: n > 1 prefills the prompt once: the later choices wait for the first one's prompt
    blocks and take them from the prefix cache; every choice equals the same choice without the cache."""
    on, off = rigs
    prompt = SYSTEM + ids(11, 9)                                  # 47 tokens: 11 full blocks of 4
    got_on, got_off = choices(on, prompt, 4), choices(off, prompt, 4)
    for r_on, r_off in zip(got_on, got_off):
        r_on.wait()
        r_off.wait()
        assert r_on.tokens == r_off.tokens
    assert len({tuple(r.tokens) for r in got_on}) > 1             # seeded choices differ
    assert got_on[0].seq.cached_tokens == 0
    assert [r.seq.cached_tokens for r in got_on[1:]] == [(len(prompt) - 1) // BS * BS] * 3
    assert [r.seq.cached_tokens for r in got_off] == [0] * 4


def test_choices_whose_leader_is_cancelled_still_run(rigs):
    on, _ = rigs
    runs = choices(on, SYSTEM + ids(12, 5), 3, cancel_first=True)
    assert runs[0].done.wait(60) and runs[0].final.reason is FinishReason.CANCELLED
    for r in runs[1:]:
        r.wait()
        assert len(r.tokens) == 6
