"""Tiered adapter cache: device slots <- host memory <- disk, LRU with pinning.

An LRU index owned by the engine thread: the cache only decides *which* adapter sits in *which*
device slot and calls `write_slot(slot, weights)` to copy one in (the engine's `AdapterSlots` own
the stacked device tensors).

  acquire(key) -> slot   device hit: pin and return the slot.
                         miss: take a free slot or evict the least recently used UNPINNED one,
                         get the weights from the host tier (or `load_from_disk`, then keep them
                         there, evicting LRU host entries), write them into the slot, pin.
                         Every slot pinned: return None at once (never blocks); the scheduler
                         keeps the request queued and retries after some release().
  release(key)           unpin once; an unpinned adapter stays resident until evicted.
  invalidate(key)        a version was deleted (the engine drains the registry's `freed` queue):
                         dropped from both tiers now, or at its last release if it is pinned.
  residency()            key -> 'device' | 'host', a snapshot other threads may read once published.
  reset_device()         forget every device slot (after an engine restart); the host tier stays.

Threading: every method belongs to the engine thread; nothing here takes a lock.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

from server.adapters.weights import AdapterWeights
from server.errors import ResourceExhausted

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class TierStats:
    hits: int = 0
    misses: int = 0  # misses that were then filled from the tier below
    evictions: int = 0
    load_seconds: float = 0.0  # device: time in write_slot; host: time in load_from_disk


@dataclass(frozen=True)
class CacheStats:
    """A snapshot, ready to export as Prometheus counters and gauges."""

    device: TierStats
    host: TierStats
    no_slot_free: int  # acquires refused because every slot was pinned
    invalidations: int
    resident_slots: int  # gauge
    pinned_slots: int  # gauge
    host_entries: int  # gauge
    host_bytes: int  # gauge


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0

    def snapshot(self) -> TierStats:
        return TierStats(self.hits, self.misses, self.evictions, self.load_seconds)


class AdapterCache(Generic[K]):
    def __init__(self, num_slots: int, max_host_entries: int, max_host_bytes: int,
                 load_from_disk: Callable[[K], AdapterWeights],
                 write_slot: Callable[[int, AdapterWeights], None]) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self.num_slots, self.max_host_entries, self.max_host_bytes = num_slots, max_host_entries, max_host_bytes
        self._load, self._write = load_from_disk, write_slot
        self._slot_keys: list[K | None] = [None] * num_slots  # slot -> key
        self._resident: OrderedDict[K, int] = OrderedDict()  # key -> slot, least recently used first
        self._pins: dict[K, int] = {}
        self._host: OrderedDict[K, AdapterWeights] = OrderedDict()  # least recently used first
        self._host_bytes = 0
        self._doomed: set[K] = set()  # invalidated while pinned: dropped at the last release
        self._device, self._host_counters = _Counters(), _Counters()
        self._no_slot_free = 0
        self._invalidations = 0

    # ------------------------------------------------------------ engine thread

    def acquire(self, key: K) -> int | None:
        """Pin `key` into a device slot and return the slot, or None if every slot is pinned.

        Raises what load_from_disk raises (NotFound, DataLoss, ...), ResourceExhausted if the
        adapter is bigger than the whole host tier, and what write_slot raises (the slot is then free).
        """
        slot = self._resident.get(key)
        if slot is not None:
            self._device.hits += 1
            self._resident.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            return slot
        slot = self._free_slot()
        if slot is None:
            self._no_slot_free += 1
            return None
        weights = self._from_host(key)
        self._device.misses += 1
        self._evict_slot(slot)
        start = time.perf_counter()
        self._write(slot, weights)  # if this raises, the slot stays empty
        self._device.load_seconds += time.perf_counter() - start
        self._slot_keys[slot] = key
        self._resident[key] = slot
        self._pins[key] = 1
        return slot

    def release(self, key: K) -> None:
        """Unpin once. ValueError if `key` is not pinned (a bug in the caller)."""
        count = self._pins.get(key, 0)
        if count < 1:
            raise ValueError(f"release of adapter {key!r}, which is not pinned")
        if count > 1:
            self._pins[key] = count - 1
        else:
            del self._pins[key]
            if key in self._doomed:
                self._doomed.discard(key)
                self._drop(key)

    def invalidate(self, key: K) -> None:
        """Forget `key` (a deleted version): now, or at its last release while it is pinned."""
        self._invalidations += 1
        self._host_drop(key)
        if key in self._pins:
            self._doomed.add(key)
        else:
            self._drop(key)

    def reset_device(self) -> None:
        """Forget every device slot (the engine restarted: slots may be half-written). Pins must
        all be released first; the host tier stays."""
        if self._pins:
            raise ValueError(f"reset_device with {len(self._pins)} adapters still pinned")
        for key in self._doomed:
            self._host_drop(key)
        self._doomed.clear()
        self._slot_keys = [None] * self.num_slots
        self._resident.clear()

    def slot_of(self, key: K) -> int | None:
        return self._resident.get(key)

    def residency(self) -> dict[K, str]:
        """key -> 'device' or 'host' for every cached adapter (absent: on disk only)."""
        out = {key: "host" for key in self._host}
        out.update((key, "device") for key in self._resident)
        return out

    def stats(self) -> CacheStats:
        return CacheStats(
            device=self._device.snapshot(), host=self._host_counters.snapshot(),
            no_slot_free=self._no_slot_free, invalidations=self._invalidations,
            resident_slots=len(self._resident), pinned_slots=len(self._pins),
            host_entries=len(self._host), host_bytes=self._host_bytes)

    # ------------------------------------------------------------ internals

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned one (not yet evicted), else None."""
        for slot, key in enumerate(self._slot_keys):
            if key is None:
                return slot
        for key, slot in self._resident.items():
            if key not in self._pins:
                return slot
        return None

    def _evict_slot(self, slot: int) -> None:
        old = self._slot_keys[slot]
        if old is not None:
            self._device.evictions += 1
            del self._resident[old]
            self._slot_keys[slot] = None

    def _from_host(self, key: K) -> AdapterWeights:
        weights = self._host.get(key)
        if weights is not None:
            self._host_counters.hits += 1
            self._host.move_to_end(key)
            return weights
        start = time.perf_counter()
        weights = self._load(key)
        self._host_counters.load_seconds += time.perf_counter() - start
        self._host_counters.misses += 1
        if weights.nbytes > self.max_host_bytes:
            raise ResourceExhausted(f"adapter {key} needs {weights.nbytes} bytes; the host adapter cache "
                                    f"holds at most {self.max_host_bytes}")
        if self.max_host_entries < 1:
            return weights
        while self._host and (len(self._host) >= self.max_host_entries
                              or self._host_bytes + weights.nbytes > self.max_host_bytes):
            self._host_counters.evictions += 1
            self._host_drop(next(iter(self._host)))
        self._host[key] = weights
        self._host_bytes += weights.nbytes
        return weights

    def _host_drop(self, key: K) -> None:
        weights = self._host.pop(key, None)
        if weights is not None:
            self._host_bytes -= weights.nbytes

    def _drop(self, key: K) -> None:
        self._host_drop(key)
        slot = self._resident.pop(key, None)
        if slot is not None:
            self._slot_keys[slot] = None
