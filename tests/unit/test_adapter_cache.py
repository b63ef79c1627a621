"""Tiered cache: LRU over unpinned slots, host tier limits, never blocking, counters, invalidation."""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.adapters.cache import AdapterCache
from server.adapters.weights import AdapterKind, AdapterWeights
from server.errors import NotFound, ResourceExhausted


def fake(nbytes: int = 100) -> AdapterWeights:
    return AdapterWeights(kind=AdapterKind.LORA, lora={}, ia3={}, bottleneck={}, prefix_kv=None,
                          prompt_embeds=None, head=None, rank=0, nbytes=nbytes, config={})


class Harness:
    """A cache whose disk and device are dictionaries that record every call."""

    def __init__(self, num_slots=2, max_host_entries=8, max_host_bytes=10_000, sizes=None, delay=0.0):
        self.sizes, self.delay = sizes or {}, delay
        self.loads: list[str] = []
        self.writes: list[tuple[int, str]] = []
        self.missing: set[str] = set()
        self.fail_write = False
        self.device: dict[int, AdapterWeights] = {}
        self.cache = AdapterCache(num_slots, max_host_entries, max_host_bytes, self.load, self.write)

    def load(self, key: str) -> AdapterWeights:
        self.loads.append(key)
        time.sleep(self.delay)
        if key in self.missing:
            raise NotFound(f"adapter {key!r} not found")
        w = fake(self.sizes.get(key, 100))
        w.config["key"] = key
        return w

    def write(self, slot: int, weights: AdapterWeights) -> None:
        if self.fail_write:
            raise RuntimeError("device out of memory")
        self.writes.append((slot, weights.config["key"]))
        self.device[slot] = weights


def test_hits_misses_and_counters():
    h = Harness(delay=0.002)
    c = h.cache
    slot = c.acquire("a")
    assert slot == 0 and h.writes == [(0, "a")] and h.loads == ["a"]
    c.release("a")
    assert c.acquire("a") == 0 and h.loads == ["a"] and len(h.writes) == 1  # device hit: no copy
    s = c.stats()
    assert (s.device.hits, s.device.misses, s.host.hits, s.host.misses) == (1, 1, 0, 1)
    assert s.host.load_seconds >= 0.002 and s.device.load_seconds >= 0
    assert (s.resident_slots, s.pinned_slots, s.host_entries, s.host_bytes) == (1, 1, 1, 100)


def test_lru_evicts_least_recent_unpinned_slot():
    h = Harness(num_slots=2)
    c = h.cache
    for key in ("a", "b"):
        c.acquire(key)
        c.release(key)
    c.acquire("a")  # a is now most recent
    c.release("a")
    assert c.acquire("c") == 1  # b's slot
    assert c.slot_of("b") is None and c.slot_of("a") == 0
    assert c.stats().device.evictions == 1
    c.acquire("b")  # back from the host tier, not from disk
    assert h.loads == ["a", "b", "c"] and c.stats().host.hits == 1 and c.slot_of("a") is None


def test_pinned_slots_are_never_evicted_and_full_means_none():
    h = Harness(num_slots=2)
    c = h.cache
    c.acquire("a")  # pinned
    c.acquire("b")
    c.release("b")
    assert c.acquire("c") == 1  # evicts b, never a
    loads, writes = list(h.loads), list(h.writes)
    start = time.perf_counter()
    assert c.acquire("d") is None  # all pinned: refuse at once, touch nothing
    assert time.perf_counter() - start < 0.1
    assert h.loads == loads and h.writes == writes and c.stats().no_slot_free == 1
    assert c.slot_of("a") == 0 and c.slot_of("c") == 1
    c.release("a")
    assert c.acquire("d") == 0


def test_all_pinned_does_not_deadlock_in_engine_thread():
    h = Harness(num_slots=1)
    h.cache.acquire("a")
    result = []
    t = threading.Thread(target=lambda: result.append(h.cache.acquire("b")))
    t.start()
    t.join(timeout=2)
    assert not t.is_alive() and result == [None]


def test_multiple_pins_need_as_many_releases():
    h = Harness(num_slots=1)
    c = h.cache
    assert c.acquire("a") == c.acquire("a") == 0
    c.release("a")
    assert c.acquire("b") is None
    c.release("a")
    assert c.acquire("b") == 0
    with pytest.raises(ValueError, match="not pinned"):
        c.release("a")


def test_host_tier_limits_entries_and_bytes():
    h = Harness(num_slots=1, max_host_entries=2, max_host_bytes=1000, sizes={"a": 400, "b": 400, "c": 400})
    c = h.cache
    for key in ("a", "b", "c"):
        c.acquire(key)
        c.release(key)
    s = c.stats()
    assert s.host_entries == 2 and s.host_bytes == 800 and s.host.evictions == 1
    c.acquire("a")  # evicted from host: back to disk
    assert h.loads == ["a", "b", "c", "a"]
    c.release("a")
    h2 = Harness(num_slots=1, max_host_entries=10, max_host_bytes=1000, sizes={"a": 600, "b": 600})
    for key in ("a", "b"):
        h2.cache.acquire(key)
        h2.cache.release(key)
    assert h2.cache.stats().host_entries == 1 and h2.cache.stats().host_bytes == 600


def test_adapter_bigger_than_host_tier_is_resource_exhausted():
    h = Harness(num_slots=2, max_host_bytes=1000, sizes={"huge": 1001})
    h.cache.acquire("a")
    h.cache.release("a")
    with pytest.raises(ResourceExhausted, match="at most 1000"):
        h.cache.acquire("huge")
    assert h.writes == [(0, "a")] and h.cache.slot_of("a") == 0 and h.cache.stats().host_bytes == 100


def test_failed_load_keeps_the_victim_resident():
    h = Harness(num_slots=1)
    h.cache.acquire("a")
    h.cache.release("a")
    h.missing.add("gone")
    with pytest.raises(NotFound):
        h.cache.acquire("gone")
    assert h.cache.slot_of("a") == 0 and h.cache.acquire("a") == 0


def test_failed_slot_write_leaves_slot_free():
    h = Harness(num_slots=1)
    h.fail_write = True
    with pytest.raises(RuntimeError, match="out of memory"):
        h.cache.acquire("a")
    assert h.cache.slot_of("a") is None and h.cache.stats().pinned_slots == 0
    h.fail_write = False
    assert h.cache.acquire("b") == 0


def test_invalidate_pinned_waits_for_last_release():
    h = Harness(num_slots=2)
    c = h.cache
    c.acquire("a")  # pinned: running request
    c.acquire("b")
    c.release("b")
    c.invalidate("a")
    c.invalidate("b")
    assert c.slot_of("b") is None and c.slot_of("a") == 0  # a still in use
    assert c.stats().host_entries == 0 and c.stats().invalidations == 2
    c.release("a")
    assert c.slot_of("a") is None and c.stats().resident_slots == 0
    c.acquire("a")  # a fresh load, not stale weights
    assert h.loads.count("a") == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acquire", "release", "invalidate"]), st.sampled_from("abcde")),
                max_size=60),
       st.integers(1, 3))
def test_random_operations_keep_invariants(ops, num_slots):
    h = Harness(num_slots=num_slots, max_host_entries=2, max_host_bytes=250)
    c = h.cache
    pins: dict[str, int] = {}
    for op, key in ops:
        if op == "acquire":
            others_pinned = len([k for k in pins if k != key])
            slot = c.acquire(key)
            if slot is None:
                assert key not in pins and others_pinned == num_slots
            else:
                pins[key] = pins.get(key, 0) + 1
                assert h.device[slot].config["key"] == key
        elif op == "release" and key in pins:
            c.release(key)
            pins[key] -= 1
            if not pins[key]:
                del pins[key]
        elif op == "invalidate":
            c.invalidate(key)
        slots = [c.slot_of(k) for k in pins]
        assert None not in slots and len(set(slots)) == len(slots)  # pinned = resident, distinct slots
        s = c.stats()
        assert s.pinned_slots == len(pins) and s.resident_slots <= num_slots and s.host_bytes <= 250
