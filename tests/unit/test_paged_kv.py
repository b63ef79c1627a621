"""The paged KV cache (issue 22): the block manager's accounting, the prefix index's isolation, and the
forward over block tables equal to transformers across block boundaries, with chunked prefill."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaForCausalLM

from server.engine.batch import Segment, make_forward_batch
from server.engine.kv_cache import NULL_BLOCK, PREFIX_TOKEN, BlockManager, KVCache, block_digest, root_digest

CPU = torch.device("cpu")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- block manager

def test_allocation_is_all_or_nothing_and_release_frees():
    bm = BlockManager(5, 4)                       # 4 usable blocks; 0 is the null block
    a = bm.allocate(3)
    assert NULL_BLOCK not in a and len(set(a)) == 3 and bm.num_used == 3
    assert bm.allocate(2) is None and bm.num_used == 3          # nothing taken
    bm.release(a)
    assert bm.num_used == 0 and bm.num_available == 4
    with pytest.raises(AssertionError, match="released twice"):
        bm.release(a[:1])


def test_registered_blocks_stay_cached_and_are_evicted_lru_last():
    bm = BlockManager(5, 2)
    space = ("t", None)
    old, new = bm.allocate(1), bm.allocate(1)
    d_old = bm.register(space, old[0], None, [1, 2])
    bm.register(("t", "t/a@1"), new[0], None, [1, 2])
    bm.release(old)
    bm.release(new)
    assert bm.num_cached == 2 and bm.num_available == 4          # cached blocks count as available
    assert bm.match(space, [1, 2], 1) == (old, [d_old])           # a hit refreshes `old` in the LRU
    got = bm.allocate(2)                                          # the two never-cached blocks first
    assert old[0] not in got and new[0] not in got and bm.num_cached == 2
    got += bm.allocate(1)                                         # then the least recently used: `new`
    assert new[0] in got and bm.evictions == 1
    assert bm.match(("t", "t/a@1"), [1, 2], 1) == ([], [])        # evicted: no longer found
    assert bm.match(space, [1, 2], 1)[0] == old


def test_a_hit_is_impossible_across_tenants_adapters_and_versions():
    """The index is per (tenant, adapter version): the same tokens under another tenant, another adapter or
    another version of it find nothing, even when the digest is forged to be the one registered."""
    bm = BlockManager(8, 4)
    toks = [5, 6, 7, 8, 9, 10, 11, 12]
    mine = ("acme", "acme/bot@1")
    blocks = bm.allocate(2)
    d0 = bm.register(mine, blocks[0], None, toks[:4])
    bm.register(mine, blocks[1], d0, toks[4:])
    assert bm.match(mine, toks, 2) == (blocks, [d0, block_digest(d0, toks[4:])])
    for other in [("globex", "acme/bot@1"), ("globex", None), ("acme", None), ("acme", "acme/bot@2"),
                  ("acme", "acme/other@1"), ("shared", "acme/bot@1")]:
        assert bm.match(other, toks, 2) == ([], []), other
        assert bm.cached_in(other) == 0
    # the digests of another namespace never enter this one's index, whatever a caller hashes
    forged = BlockManager(8, 4)
    b = forged.allocate(1)
    forged.register(mine, b[0], None, toks[:4])
    forged._index.setdefault(("globex", None), {})[block_digest(root_digest(mine), toks[:4])] = b[0]
    assert forged.match(("globex", None), toks, 1) == ([], [])      # verified against the block's own key


def test_the_chain_covers_the_parent_and_virtual_positions():
    bm = BlockManager(8, 2)
    space = ("t", "t/p@1")
    first, second = bm.allocate(2)
    d = bm.register(space, first, None, [PREFIX_TOKEN, PREFIX_TOKEN])
    bm.register(space, second, d, [3, 4])
    assert bm.match(space, [PREFIX_TOKEN, PREFIX_TOKEN, 3, 4], 2)[0] == [first, second]
    assert bm.match(space, [0, 0, 3, 4], 2) == ([], [])           # real ids are never virtual positions
    assert bm.match(space, [3, 4], 1) == ([], [])                 # a block is found under its own parent only
    assert bm.match(space, [PREFIX_TOKEN, PREFIX_TOKEN, 3, 5], 2)[0] == [first]


def test_forget_drops_a_version_and_failed_blocks_are_not_kept():
    bm = BlockManager(6, 2)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(("t", "t/x@1"), a[0], None, [1, 2])
    bm.register(("u", "t/x@1"), b[0], None, [1, 2])           # a shared adapter, another tenant's namespace
    bm.release(a)
    assert bm.forget("t/x@1") == 2 and bm.num_cached == 0
    assert bm.num_used == 1                                   # b is still held by its sequence
    bm.release(b)
    assert bm.num_available == 5 and bm.num_cached == 0
    c = bm.allocate(1)
    bm.register(("t", None), c[0], None, [1, 2])
    bm.release(c, keep_cached=False)
    assert bm.num_cached == 0 and bm.match(("t", None), [1, 2], 1) == ([], [])


def test_prefix_cache_off_registers_nothing():
    bm = BlockManager(4, 2, prefix_cache=False)
    a = bm.allocate(1)
    bm.register(("t", None), a[0], None, [1, 2])
    bm.release(a)
    assert bm.num_cached == 0 and bm.match(("t", None), [1, 2], 1) == ([], [])


def test_fresh_blocks_are_zeroed_before_use(tiny_loaded):
    kv = KVCache(tiny_loaded.model.shape, 4, 4, CPU, torch.float32)
    for k, v in kv.layers:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
        k[:, NULL_BLOCK] = 0
        v[:, NULL_BLOCK] = 0
    b = kv.blocks.allocate(2)
    kv.zero_fresh()
    for k, v in kv.layers:
        assert torch.count_nonzero(k[:, b]) == 0 and torch.count_nonzero(v[:, b]) == 0
        assert torch.isnan(k[:, [x for x in range(1, 4) if x not in b]]).all()


# ---------------------------------------------------------------- the forward over block tables

def scattered(kv: KVCache, lengths: list[int]) -> list[list[int]]:
    """Block tables taken in an interleaved, reversed order: no sequence's blocks are contiguous."""
    need = [kv.blocks.blocks_for(n) for n in lengths]
    ids = iter(kv.blocks.allocate(sum(need))[::-1])
    kv.zero_fresh()
    tables: list[list[int]] = [[] for _ in lengths]
    while any(len(t) < k for t, k in zip(tables, need)):
        for t, k in zip(tables, need):
            if len(t) < k:
                t.append(next(ids))
    return tables


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_block_boundaries_prefill_chunks_and_decode_match_hf(tiny_model_dir, tiny_loaded, bs):
    """Prompts of block size - 1, block size and block size + 1 (and two blocks + 1), prefilled in
    chunks that end inside and on block boundaries, next to each other's decode rows, then decoded
    across the next boundary: every logit row equals transformers' on the whole sequence."""
    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model = tiny_loaded.model
    g = torch.Generator().manual_seed(bs)
    lens = sorted({max(1, bs - 1), bs, bs + 1, 2 * bs + 1})
    seqs = [torch.randint(3, 259, (n,), generator=g).tolist() for n in lens]
    kv = KVCache(model.shape, 1 + sum(-(-(n + 12) // bs) for n in lens) + 3, bs, CPU, torch.float32)
    tables = scattered(kv, [n + 12 for n in lens])
    done = [0] * len(seqs)
    chunk = max(2, bs // 2 + 1)
    with torch.no_grad():
        while True:
            segs, idx = [], []
            for i, s in enumerate(seqs):
                n = min(chunk, len(s) - done[i])
                if n > 0 or len(s) < lens[i] + 6:
                    if n <= 0:                                # prefilled: decode (one token)
                        n = 1
                    segs.append(Segment(tables[i], s[done[i]:done[i] + n], done[i], done[i] + n == len(s)))
                    idx.append(i)
            if not segs:
                break
            out = model.forward(make_forward_batch(segs, CPU, bs), kv.layers)
            rows = iter(out)
            for seg, i in zip(segs, idx):
                done[i] += len(seg.token_ids)
                if seg.want_logits:
                    logits = next(rows)
                    ref = hf(torch.tensor([seqs[i]])).logits[0, -1]
                    assert rel(logits, ref) < 1e-4, (bs, lens[i], done[i])
                    if len(seqs[i]) < lens[i] + 6:
                        seqs[i].append(int(logits.argmax()))


def test_a_batch_never_reads_another_sequences_blocks(tiny_loaded):
    """Two sequences with interleaved blocks: poisoning every block but a row's own leaves its
    output unchanged (the gather reads only its table, the null padding and masked tails are zero)."""
    model = tiny_loaded.model
    kv = KVCache(model.shape, 12, 4, CPU, torch.float32)
    a, b = scattered(kv, [10, 3])
    pa, pb = list(range(3, 13)), [7, 8, 9]
    segs = [Segment(a, pa, 0, True), Segment(b, pb, 0, True)]
    with torch.no_grad():
        want = model.forward(make_forward_batch(segs, CPU, 4), kv.layers)
        dec = [Segment(a, [5], 10, True), Segment(b, [6], 3, True)]
        want_dec = model.forward(make_forward_batch(dec, CPU, 4), kv.layers)
        others = [x for x in range(1, 12) if x not in a + b]
        for k, v in kv.layers:
            k[:, others] = float("nan")
            v[:, others] = float("nan")
        got = model.forward(make_forward_batch(segs, CPU, 4), kv.layers)
        got_dec = model.forward(make_forward_batch(dec, CPU, 4), kv.layers)
    assert torch.equal(got, want) and torch.equal(got_dec, want_dec)


def test_a_block_table_too_short_is_refused():
    with pytest.raises(ValueError, match="cannot hold position 4"):
        make_forward_batch([Segment([1], [1, 2, 3, 4, 5], 0, True)], CPU, 4)


# ---------------------------------------------------------------- contiguous runs and the in-place view

def test_a_sequence_gets_a_run_and_grows_into_it():
    bm = BlockManager(20, 4)
    a, run_a = bm.allocate_run(2, 5)
    assert a == [1, 2] and run_a == (1, 6)
    b, run_b = bm.allocate_run(2, 5)                   # the first run's tail is reserved: skipped
    assert b == [6, 7] and run_b == (6, 11)
    assert bm.allocate_next(a[-1]) == [3]              # grows in place
    assert bm.allocate(3) == [11, 12, 13]              # plain allocations avoid reserved blocks...
    bm.allocate(6)                                     # ...until only reserved ones are left
    assert bm.num_free == 5 and bm.allocate(2) == [4, 5]
    assert bm.allocate_next(b[-1]) == [8]
    bm.unreserve(run_b)
    assert bm.allocate_run(1, 3) == ([9], None)        # no free run of 3: scattered, no reservation
    assert bm.allocate_next(a[-1] + 2) == [10]         # 5 + 1 is taken: the next free block
    assert bm.allocate_run(2, 3) is None and bm.num_free == 0


def test_even_runs_are_read_in_place_and_equal_the_gather(tiny_model_dir, tiny_loaded):
    """Decode rows whose tables are evenly spaced contiguous runs are one strided view of the pool
    (no copy); the result equals the gathered path and transformers'."""
    hf = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    model = tiny_loaded.model
    kv = KVCache(model.shape, 40, 4, CPU, torch.float32)
    runs = [kv.blocks.allocate_run(3, 4)[0] for _ in range(3)]        # blocks 1-3, 5-7, 9-11
    kv.zero_fresh()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 259, (10,), generator=g).tolist() for _ in runs]
    with torch.no_grad():
        model.forward(make_forward_batch([Segment(t, s, 0, False) for t, s in zip(runs, seqs)], CPU, 4), kv.layers)
        dec = [Segment(t, [9], 10, True) for t in runs]
        batch = make_forward_batch(dec, CPU, 4)
        assert batch.decode_views == ((0, 3, 1, 4),)
        got = model.forward(batch, kv.layers)
        gathered = model.forward(dataclasses.replace(batch, decode_views=None), kv.layers)
        torch.testing.assert_close(got, gathered, rtol=1e-6, atol=1e-6)
        for i, s in enumerate(seqs):
            assert rel(got[i], hf(torch.tensor([s + [9]])).logits[0, -1]) < 1e-4
    def view(tables: list[list[int]], positions: list[int]):
        return make_forward_batch([Segment(t, [1], p, True) for t, p in zip(tables, positions)], CPU, 4).decode_views
    assert view([[1, 2, 3], [4, 5, 6]], [11, 11]) == ((0, 2, 1, 3),)
    assert view([[1, 2], [5, 6]], [3, 7]) is None                 # row 0 needs one block: null padding
    assert view([[1, 3, 4]], [11]) is None                       # not contiguous
    assert view([[5, 6, 7], [1, 2, 3]], [11, 11]) == ((0, 1, 5, 3), (1, 1, 1, 3))      # two groups
    assert view([[1, 2, 3], [4, 5, 6], [8, 9, 10], [12, 13, 14]], [11] * 4) == ((0, 2, 1, 3), (2, 2, 8, 4))
    firsts = [1, 4, 10, 19, 31, 46, 64, 85, 109, 136]             # gaps 3, 6, 9, ...: 5 groups of 2
    assert view([[f, f + 1, f + 2] for f in firsts], [11] * 10) is None
