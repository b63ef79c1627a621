"""Sequence text handling (stop strings, hold-back) and the scheduler's admission/eviction."""
from __future__ import annotations

from server.engine.kv_cache import BlockManager, KVCache
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import FinishEvent, FinishReason, Sequence, TokenEvent
from server.model.default import build_tokenizer

TOK = build_tokenizer()


def ids_of(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False).ids


def run(text: str, **params) -> list:
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=params.pop("n", 100), **params), sink=lambda e: None)
    events = []
    for t in ids_of(text):
        ev = seq.append_token(t, TOK, frozenset({2}))
        if ev:
            events.append(ev)
        if seq.finished:
            break
    return events


def joined(events) -> str:
    return "".join(e.text for e in events)


def test_stop_string_truncates_and_never_leaks():
    evs = run("hello world, stop here", stop=("world",))
    assert isinstance(evs[-1], FinishEvent) and evs[-1].reason == FinishReason.STOP
    assert joined(evs) == "hello "


def test_partial_stop_prefix_is_held_back_then_released():
    evs = run("abcwoXYZ", stop=("wor",), n=8)
    assert joined(evs) == "abcwoXYZ"
    assert evs[-1].reason == FinishReason.LENGTH
    assert [e.text for e in evs] == ["a", "b", "c", "woX", "Y", "Z"]  # "w", "wo" held until "X"


def test_multibyte_characters_are_never_split():
    evs = run("é😀ü", n=100)
    for e in evs:
        assert "\ufffd" not in e.text
    assert joined(evs) == "é😀ü"


def test_eos_and_length():
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=3), sink=lambda e: None)
    assert isinstance(seq.append_token(ids_of("a")[0], TOK, frozenset({2})), TokenEvent)
    ev = seq.append_token(2, TOK, frozenset({2}))
    assert ev.reason == FinishReason.EOS and ev.completion_tokens == 2


def Slots(n: int, tokens: int = 512, block_size: int = 16) -> BlockManager:
    """A KV pool with room for `n` sequences of `tokens` positions (the tests below were written
    for one KV slot per sequence; rows are bounded by max_batch_size either way)."""
    return BlockManager(n * -(-tokens // block_size) + 1, block_size)


def seq(n_prompt: int, **kw) -> Sequence:
    return Sequence("r", list(range(3, 3 + n_prompt)), SamplingParams(max_new_tokens=5), sink=lambda e: None, **kw)


def test_admission_bounded_by_slots_and_finished_rows_free_them():
    s = Scheduler(Slots(2), max_batch_size=2, max_prefill_tokens=100)
    a, b, c = seq(4), seq(4), seq(4)
    for x in (a, b, c):
        s.add(x)
    assert s.admit() == [a, b]
    assert list(s.waiting) == [c]
    s.remove(a)
    assert a.blocks is None
    assert s.admit() == [c]


def test_prefill_budget_chunks_prompts_and_decode_comes_first():
    s = Scheduler(Slots(3), max_batch_size=3, max_prefill_tokens=10)
    a, b = seq(8), seq(8)
    s.add(a)
    s.add(b)
    s.admit()
    work = s.schedule()
    assert [(w.seq, len(w.token_ids), w.want_logits) for w in work] == [(a, 8, True), (b, 2, False)]
    a.num_computed, b.num_computed = 8, 2
    a.output_ids.append(5)
    work = s.schedule()
    assert [(w.seq, len(w.token_ids), w.first_pos) for w in work] == [(a, 1, 8), (b, 6, 2)]
    assert work[1].want_logits


def test_expired_lists_cancelled_and_past_deadline():
    s = Scheduler(Slots(1), max_batch_size=1, max_prefill_tokens=10)
    a, b, c = seq(2), seq(2, deadline=0.0), seq(2)
    for x in (a, b, c):
        s.add(x)
    c.cancel()
    assert set(s.expired(now=1.0)) == {b, c}


def test_kv_cache_block_accounting():
    from server.model.shape import BaseModelShape
    import torch
    shape = BaseModelShape(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=4, vocab_size=10)
    kv = KVCache(shape, 3, 16, torch.device("cpu"), torch.float32)
    a, b = kv.blocks.allocate(1), kv.blocks.allocate(1)
    assert {a[0], b[0]} == {1, 2} and kv.blocks.allocate(1) is None and kv.usage == 1.0
    assert kv.blocks.allocate(2) is None and kv.blocks.num_used == 2        # all or nothing
    kv.blocks.release(a)
    assert kv.blocks.num_available == 1 and kv.usage == 0.5


def tseq(tenant: str) -> Sequence:
    return Sequence("r", [3, 4], SamplingParams(max_new_tokens=5), sink=lambda e: None, tenant=tenant)


def test_one_tenants_backlog_cannot_starve_another():
    s = Scheduler(Slots(1), max_batch_size=1, max_prefill_tokens=100)
    flood = [tseq("a") for _ in range(1000)]
    for x in flood:
        s.add(x)
    lone = tseq("b")
    s.add(lone)
    first = s.admit()
    assert first == [flood[0]]
    s.remove(first[0])
    assert s.admit() == [lone]          # b's single request goes next, not after 999 of a's
    s.remove(lone)
    assert s.admit() == [flood[1]]


def test_round_robin_over_many_tenants():
    s = Scheduler(Slots(6), max_batch_size=6, max_prefill_tokens=100)
    seqs = {t: [tseq(t) for _ in range(5)] for t in "abc"}
    for i in range(5):
        for t in "abc":
            s.add(seqs[t][i])
    got = s.admit()
    assert [x.tenant for x in got] == list("abcabc")


def test_unready_adapter_keeps_waiting_without_blocking_others():
    slots = Slots(2)
    s = Scheduler(slots, max_batch_size=2, max_prefill_tokens=100)
    blocked, other = tseq("a"), tseq("b")
    s.add(blocked)
    s.add(other)
    assert s.admit(make_ready=lambda q: q is not blocked) == [other]
    assert list(s.waiting) == [blocked]
    assert slots.num_used == 1           # `other`'s block only: none was taken for `blocked`
    assert s.admit() == [blocked]


def long_seq(tenant: str, n: int) -> Sequence:
    return Sequence("r", list(range(3, 3 + n)), SamplingParams(max_new_tokens=5), sink=lambda e: None, tenant=tenant)


def test_short_prompt_is_not_queued_behind_long_prefills():
    """Issue 16 finding 3: tenant b's 8-token prompt gets its whole prefill in the first step
    after admission, although tenant a's long prompts were admitted first."""
    s = Scheduler(Slots(8), max_batch_size=8, max_prefill_tokens=512)
    heavy = [long_seq("a", 447) for _ in range(4)]
    for x in heavy:
        s.add(x)
    lone = long_seq("b", 8)
    s.add(lone)
    s.admit()
    work = {w.seq: w for w in s.schedule()}
    assert lone in work and len(work[lone].token_ids) == 8 and work[lone].want_logits
    assert sum(len(w.token_ids) for w in work.values()) <= 512


def decoding_beside(s: Scheduler, decoder: str, prefiller: str) -> Sequence:
    """A 2-token sequence of tenant `decoder`, prefilled and decoding, then a 400-token prompt of
    tenant `prefiller` admitted beside it; returns the decoding one."""
    dec = long_seq(decoder, 2)
    s.add(dec)
    s.admit()
    dec.num_computed, dec.output_ids = 2, [7]          # prefilled, decoding
    s.add(long_seq(prefiller, 400))
    s.admit()
    return dec


def test_decode_rows_bound_the_prefill_budget():
    s = Scheduler(Slots(4), max_batch_size=4, max_prefill_tokens=512, decode_prefill_tokens=32)
    dec = decoding_beside(s, "b", "a")
    work = s.schedule()
    assert sum(len(w.token_ids) for w in work if w.seq is not dec) == 32
    s.remove(dec)
    assert sum(len(w.token_ids) for w in s.schedule()) == 400    # no decode rows: the full budget


def test_one_tenants_decodes_do_not_shrink_its_prefill_budget():
    """Issue 24: on a single-tenant server a burst (early arrivals decoding, the rest prefilling)
    is prefilled at the full budget; with several tenants its own decodes cap the step, as before."""
    for multi_tenant, expect in ((False, 400), (True, 32)):
        s = Scheduler(Slots(8), max_batch_size=8, max_prefill_tokens=512, decode_prefill_tokens=32,
                      multi_tenant=multi_tenant)
        dec = decoding_beside(s, "a", "a")
        work = s.schedule()
        assert [len(w.token_ids) for w in work if w.seq is dec] == [1]
        assert sum(len(w.token_ids) for w in work if w.seq is not dec) == expect


def test_a_burst_cannot_take_the_slots_kept_for_waiting_tenants():
    s = Scheduler(Slots(8), max_batch_size=8, max_prefill_tokens=100)
    burst = [tseq("a") for _ in range(20)]
    for x in burst:
        s.add(x)
    s.add(tseq("b"))
    s.add(tseq("c"))
    got = s.admit()
    assert sorted(x.tenant for x in got) == ["a"] * 6 + ["b", "c"]
    alone = Scheduler(Slots(4), max_batch_size=4, max_prefill_tokens=100)
    for x in [tseq("a") for _ in range(6)]:
        alone.add(x)
    assert len(alone.admit()) == 4                    # nobody else waits: a may use every slot
    late = tseq("b")
    alone.add(late)
    alone.remove(alone.running[0])
    assert alone.admit() == [late]                    # the freed slot goes to the waiting tenant


def test_a_slot_is_kept_for_a_tenant_with_nothing_running():
    """Issue 20, finding 9: one tenant's long requests hold every slot but the reserved one; a
    newcomer is admitted at once, without waiting for one of them to finish."""
    s = Scheduler(Slots(4), max_batch_size=4, max_prefill_tokens=100, reserve_slots=1)
    for x in [tseq("a") for _ in range(6)]:
        s.add(x)
    assert len(s.admit()) == 3
    late = tseq("b")
    s.add(late)
    assert s.admit() == [late]
    s.add(tseq("c"))
    assert s.admit() == []                     # no slot free: c waits for one, a cannot take it either


def test_prefill_budget_is_shared_max_min_fair_by_tenant():
    s = Scheduler(Slots(8), max_batch_size=8, max_prefill_tokens=300, decode_prefill_tokens=32)
    heavy = [long_seq("a", 400) for _ in range(3)]
    medium = long_seq("b", 120)
    for x in [*heavy, medium]:
        s.add(x)
    s.admit()
    got = {}
    for w in s.schedule():
        got[w.seq.tenant] = got.get(w.seq.tenant, 0) + len(w.token_ids)
    assert got == {"a": 180, "b": 120}                 # b needs less than half: a gets the rest


def test_a_short_prompt_beside_a_long_prefill_gets_a_short_step():
    """The step that carries tenant b's 8-token prompt next to tenant a's long prefill is short
    (decode_prefill_tokens), so b's first token is not held behind a full prefill step."""
    s = Scheduler(Slots(8), max_batch_size=8, max_prefill_tokens=512, decode_prefill_tokens=64)
    for x in [long_seq("a", 447) for _ in range(4)]:
        s.add(x)
    lone = long_seq("b", 8)
    s.add(lone)
    s.admit()
    work = s.schedule()
    assert sum(len(w.token_ids) for w in work) == 64
    assert [len(w.token_ids) for w in work if w.seq is lone] == [8]
    s.remove(lone)
    assert sum(len(w.token_ids) for w in s.schedule()) == 512      # a alone: the full budget


def test_room_for_a_newcomer_is_kept_in_blocks():
    """Issue 22: with `reserve_slots`, one tenant's sequences may not be admitted into the last
    `reserve_blocks` KV blocks; a tenant with nothing running is, at the next admission."""
    pool = BlockManager(41, 16)                                   # 40 blocks
    s = Scheduler(pool, max_batch_size=16, max_prefill_tokens=64, reserve_slots=1)
    assert s.reserve_blocks == 4
    for x in [long_seq("a", 50) for _ in range(12)]:              # 4 blocks each (50 + 5 new tokens)
        s.add(x)
    got = s.admit()
    assert len(got) == 9 and pool.num_available == 4              # a stops short of the reserve
    late = long_seq("b", 50)
    s.add(late)
    assert s.admit() == [late] and pool.num_available == 0
    s.add(long_seq("c", 50))
    assert s.admit() == []                                        # nothing left: c waits
    alone = Scheduler(BlockManager(41, 16), max_batch_size=16, max_prefill_tokens=64)
    for x in [long_seq("a", 50) for _ in range(12)]:
        alone.add(x)
    assert len(alone.admit()) == 10                               # one tenant, no reserve: every block


def test_decode_growth_preempts_the_youngest_of_the_heaviest_tenant():
    pool = BlockManager(9, 4, prefix_cache=False)                 # 8 blocks of 4 tokens
    s = Scheduler(pool, max_batch_size=8, max_prefill_tokens=100)
    preempted = []
    s.on_preempt = preempted.append
    a1, a2, b1 = long_seq("a", 7), long_seq("a", 7), long_seq("b", 7)     # 2 blocks each
    for x in (a1, a2, b1):
        s.add(x)
    assert sorted(map(id, s.admit())) == sorted(map(id, (a1, a2, b1))) and pool.num_available == 2
    for x in (a1, a2, b1):                                        # prefilled, each sampled a token
        s.computed(x, 7)
        x.output_ids.append(5)
    s.schedule()                                                   # position 7: no new block yet
    for x in (a1, a2, b1):
        s.computed(x, 8)
        x.output_ids.append(5)
    work = s.schedule()                                            # position 8: each needs a third block
    assert preempted == [a2]                                       # a holds 4 blocks: its youngest goes
    assert [w.seq for w in work] == [a1, b1] and a2.blocks is None and a2.num_computed == 0
    assert list(s.waiting) == [a2] and pool.num_used == 6
    s.remove(a1)
    assert s.admit() == [a2] and a2.num_computed == 0              # recomputed: prompt and output so far
    assert [len(w.token_ids) for w in s.schedule() if w.seq is a2] == [9]
