"""Paged KV: one pool of fixed-size blocks per layer, the block manager, and the prefix-cache index.

Storage (`KVCache`): per layer a K and a V tensor `[kv_heads, num_blocks, block_size, head_dim]`
(head-major, so the blocks of a batch gathered along dim 1 are at once the `[kv_heads, rows, keys,
head_dim]` operand of the attention matmuls, no second copy). A sequence's K/V live in the blocks of
its *block table* (a list of block ids, position p in block `table[p // block_size]`, offset
`p % block_size`). Block 0 is the null block: zeros, never handed out, the padding of block tables.
Blocks are zeroed when handed out (`zero_fresh`), so the masked tail of a sequence's last block never
holds a previous owner's values (0 * NaN would poison the softmax-weighted sum).

Ownership (`BlockManager`, no tensors; nano-vllm's block manager is the model): free block ids,
reference counts, and the prefix-cache index. The scheduler asks it (`can_allocate`, `allocate`,
`allocate_run`, `allocate_next`, `match`, `take`, `release`, `register`); only the engine thread
calls it. Blocks are handed out lowest id first, and a sequence's blocks contiguously where the
pool allows: at admission it takes a free run long enough for its whole context (the blocks beyond
its prompt stay free but *reserved*: handed to others only when no unreserved block is left), and
grows into the next block of that run. Rows whose blocks are contiguous and evenly spaced are read
in place, as one strided view (batch.py `decode_view`); the others through a gather.

Prefix caching: a *full* block whose K/V are computed is registered under a digest chained over
  root  = H(tenant, adapter key with its version)      (None for the base model)
  block = H(parent digest, the block's token ids)
in an index kept per namespace (tenant, adapter key): a lookup only ever searches the caller's own
tenant and adapter version, so a block of another tenant, another adapter, or an older version of
the same adapter can never be found (there is no shared index to collide in). Virtual positions are
part of the token ids: a prefix-tuning KV position hashes as PREFIX_TOKEN, a prompt-tuning virtual
token as VIRTUAL_TOKEN (real ids are >= 0), so a block holding an adapter's virtual K/V never matches
a row without them. A match is verified against the registered block's parent digest and tokens.
Unreferenced registered blocks stay cached in an LRU and are evicted (oldest first) only when
`allocate` finds no plain free block.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from server.model.shape import BaseModelShape

NULL_BLOCK = 0
PREFIX_TOKEN = -1      # a prefix-tuning K/V position, in the token ids hashed into the chain
VIRTUAL_TOKEN = -2     # a prompt-tuning virtual token
Namespace = tuple[str, str | None]   # (tenant, adapter key 'tenant/name@N' or None for the base model)


def root_digest(space: Namespace) -> bytes:
    tenant, adapter = space
    return hashlib.blake2b(f"{tenant}\0{adapter or ''}\0{adapter is None}".encode(), digest_size=16).digest()


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    """Block ids 1..num_blocks-1 (0 is the null block): reference counts, free ids, the prefix index
    and the LRU of unreferenced cached blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need at least 2 blocks (one is the null block) of >= 1 token, got "
                             f"{num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free = np.ones(num_blocks, dtype=bool)             # free, not cached (the null block never)
        self._free[NULL_BLOCK] = False
        self._reserved = np.zeros(num_blocks, dtype=bool)        # free, kept for a sequence's growth
        self._num_free = num_blocks - 1
        self._ref = [0] * num_blocks
        self._key: list[tuple[Namespace, bytes, bytes, tuple[int, ...]] | None] = [None] * num_blocks
        self._index: dict[Namespace, dict[bytes, int]] = {}      # namespace -> digest -> block
        self._lru: OrderedDict[int, None] = OrderedDict()        # cached, unreferenced; oldest first
        self.fresh: list[int] = []                                # handed out since the last zero_fresh
        self.evictions = 0

    # ---- sizes
    @property
    def capacity(self) -> int:
        """Blocks that can hold K/V (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out now: free ones plus cached unreferenced ones (evicted)."""
        return self._num_free + len(self._lru)

    @property
    def num_free(self) -> int:
        """Blocks neither referenced nor cached."""
        return self._num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept by the prefix cache."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.capacity - self.num_available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation
    def can_allocate(self, n: int, hits: Sequence[int] = (), keep: int = 0) -> bool:
        """Whether `n` new blocks can be allocated after taking `hits`, leaving `keep` available."""
        lru_hits = sum(1 for b in hits if b in self._lru)
        return self.num_available - lru_hits >= n + keep

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks with reference count 1, or None (nothing taken) when fewer are available.
        Free unreserved blocks go first (lowest id first), then free reserved ones; then the least
        recently used cached blocks are evicted."""
        if n > self.num_available:
            return None
        out = np.flatnonzero(self._free & ~self._reserved)[:n].tolist()
        if len(out) < n:
            out += np.flatnonzero(self._free & self._reserved)[:n - len(out)].tolist()
        self._take_free(out)
        while len(out) < n:
            b, _ = self._lru.popitem(last=False)
            self._unregister(b)
            self.evictions += 1
            self._ref[b] = 1
            self.fresh.append(b)
            out.append(b)
        return out

    def allocate_run(self, n: int, extent: int) -> tuple[list[int], tuple[int, int] | None] | None:
        """`n` contiguous blocks at the start of the lowest free unreserved run of `extent` >= n
        blocks, the rest of the run reserved for the caller's growth: (blocks, (start, end) of the
        run). When no such run is free, least recently used cached blocks are evicted (as `allocate`
        would, at most 2 x extent of them) until one is. Without a run, `allocate(n)` and no run;
        None when even that fails."""
        if n <= 0:
            return [], None
        if n > self.num_available:
            return None
        start = self._find_run(extent)
        for _ in range(min(len(self._lru), 2 * extent) if start is None else 0):
            b, _ = self._lru.popitem(last=False)
            self._unregister(b)
            self.evictions += 1
            self._put_free(b)
            lo, hi = b, b + 1                                   # the free unreserved span around b
            while lo - 1 > NULL_BLOCK and self._free[lo - 1] and not self._reserved[lo - 1]:
                lo -= 1
            while hi < self.num_blocks and self._free[hi] and not self._reserved[hi]:
                hi += 1
            if hi - lo >= extent:
                start = lo
                break
        if start is None:
            got = self.allocate(n)
            return None if got is None else (got, None)
        out = list(range(start, start + n))
        self._take_free(out)
        self._reserved[start + n:start + extent] = True
        return out, (start, start + extent)

    def _find_run(self, extent: int) -> int | None:
        """The first block of the lowest free unreserved run of `extent` blocks, or None."""
        mask = np.concatenate(([False], self._free & ~self._reserved, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(mask))                  # run starts and ends, alternating
        starts, ends = edges[0::2], edges[1::2]
        fit = np.flatnonzero(ends - starts >= extent)
        return int(starts[fit[0]]) if fit.size else None

    def allocate_next(self, last: int) -> list[int] | None:
        """One block for a sequence whose table ends with `last`: `last + 1` when it is free (its
        reserved run), else as `allocate(1)`."""
        b = last + 1
        if b < self.num_blocks and self._free[b]:
            self._take_free([b])
            return [b]
        return self.allocate(1)

    def unreserve(self, extent: tuple[int, int] | None) -> None:
        """A sequence's run is no longer needed (it ended, or was preempted)."""
        if extent is not None:
            self._reserved[extent[0]:extent[1]] = False

    def _take_free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._free[b], f"KV block {b} is not free"
            self._free[b] = self._reserved[b] = False
            self._ref[b] = 1
        self._num_free -= len(blocks)
        self.fresh.extend(blocks)

    def _put_free(self, b: int) -> None:
        self._free[b] = True
        self._num_free += 1

    def take(self, blocks: Sequence[int]) -> None:
        """One more reference to each (cached) block: a prefix-cache hit."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1

    def release(self, blocks: Sequence[int], keep_cached: bool = True) -> None:
        """Drop one reference to each block; at zero a registered block stays cached (unless
        `keep_cached` is False: a failed sequence's blocks are not trusted), others are free."""
        for b in reversed(blocks):
            assert self._ref[b] > 0, f"KV block {b} released twice"
            self._ref[b] -= 1
            if self._ref[b]:
                continue
            if self._key[b] is not None and keep_cached:
                self._lru[b] = None
            else:
                self._unregister(b)
                self._put_free(b)

    # ---- the prefix index
    def match(self, space: Namespace, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], list[bytes]]:
        """The longest chain of cached full blocks for `tokens` (hashing ids, from position 0) in
        `space`, at most `max_blocks` of them: (blocks, their digests). Takes no reference."""
        if not self.prefix_cache:
            return [], []
        index = self._index.get(space)
        blocks: list[int] = []
        digests: list[bytes] = []
        if not index:
            return blocks, digests
        parent, bs = root_digest(space), self.block_size
        for i in range(max_blocks):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            digest = block_digest(parent, chunk)
            b = index.get(digest)
            if b is None or self._key[b] != (space, digest, parent, chunk):
                break
            blocks.append(b)
            digests.append(digest)
            parent = digest
        for b in blocks:                       # a hit is a use: most recently used in the LRU
            if b in self._lru:
                self._lru.move_to_end(b)
        return blocks, digests

    def register(self, space: Namespace, block: int, parent: bytes | None, tokens: Sequence[int]) -> bytes:
        """Record a full, computed block under its chained digest (`parent` None: the first block);
        returns the digest. When the digest is already cached (another sequence computed the same
        block), the block stays private and is freed as usual."""
        parent = root_digest(space) if parent is None else parent
        chunk = tuple(tokens)
        digest = block_digest(parent, chunk)
        if not self.prefix_cache or self._key[block] is not None:
            return digest
        index = self._index.setdefault(space, {})
        if digest not in index:
            index[digest] = block
            self._key[block] = (space, digest, parent, chunk)
        return digest

    def forget(self, adapter: str) -> int:
        """Drop every cached block of one adapter version (all tenants' namespaces): the version
        was deleted. Referenced blocks stay with their sequences, unregistered. Returns blocks dropped."""
        dropped = 0
        for space in [s for s in self._index if s[1] == adapter]:
            for b in list(self._index[space].values()):
                self._unregister(b)
                if self._ref[b] == 0:
                    del self._lru[b]
                    self._put_free(b)
                dropped += 1
        return dropped

    def cached_in(self, space: Namespace) -> int:
        """Blocks registered in one namespace (tests, metrics)."""
        return len(self._index.get(space, ()))

    def _unregister(self, b: int) -> None:
        key = self._key[b]
        if key is None:
            return
        self._key[b] = None
        index = self._index.get(key[0])
        if index is not None and index.get(key[1]) == b:
            del index[key[1]]
            if not index:
                del self._index[key[0]]


class KVCache:
    """The K/V tensors of every layer and the block manager that hands out their blocks."""

    def __init__(self, shape: BaseModelShape, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, prefix_cache: bool = True):
        self.blocks = BlockManager(num_blocks, block_size, prefix_cache)
        self.block_size, self.shape = block_size, shape
        size = (shape.num_kv_heads, num_blocks, block_size, shape.head_dim)
        # empty, not zeros: pages are committed as blocks are first written (resident memory follows use)
        self.layers = [(torch.empty(size, device=device, dtype=dtype),           # k, v [Hkv, N, bs, hd]
                        torch.empty(size, device=device, dtype=dtype)) for _ in range(shape.num_layers)]
        for k, v in self.layers:
            k[:, NULL_BLOCK].zero_()
            v[:, NULL_BLOCK].zero_()

    @staticmethod
    def block_bytes(shape: BaseModelShape, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * shape.num_layers * shape.num_kv_heads * block_size * shape.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks that can hold K/V (the null block aside)."""
        return self.blocks.capacity * self.block_bytes(self.shape, self.block_size, self.layers[0][0].dtype)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, 0..1."""
        return self.blocks.num_used / self.blocks.capacity

    @classmethod
    def for_sequences(cls, shape: BaseModelShape, lengths: Sequence[int], device: torch.device,
                      dtype: torch.dtype, block_size: int = 16) -> tuple["KVCache", list[list[int]]]:
        """A cache just big enough for sequences of these lengths and their block tables (bare
        forwards: tests, benches, the adapter probe)."""
        need = [-(-n // block_size) for n in lengths]
        kv = cls(shape, sum(need) + 1, block_size, device, dtype, prefix_cache=False)
        tables = [kv.blocks.allocate(k) for k in need]
        kv.zero_fresh()
        return kv, tables

    def zero_fresh(self) -> None:
        """Zero the blocks handed out since the last call (before they are first read)."""
        if not self.blocks.fresh:
            return
        ids = torch.tensor(self.blocks.fresh, dtype=torch.long, device=self.layers[0][0].device)
        self.blocks.fresh = []
        for k, v in self.layers:
            k.index_fill_(1, ids, 0)
            v.index_fill_(1, ids, 0)

    def write(self, block_table: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Write K/V for positions [start, start + n) of a sequence: kv [layers, 2, kv_heads, n, hd]
        (an adapter's prefix-tuning K/V)."""
        n, bs = kv.shape[3], self.block_size
        pos = torch.arange(start, start + n)
        table = torch.tensor(list(block_table), dtype=torch.long)
        slots = (table[pos // bs] * bs + pos % bs).to(self.layers[0][0].device)
        for layer, (k, v) in enumerate(self.layers):
            hkv, _, _, hd = k.shape
            k.view(hkv, -1, hd).index_copy_(1, slots, kv[layer, 0].to(k.dtype))
            v.view(hkv, -1, hd).index_copy_(1, slots, kv[layer, 1].to(v.dtype))
