"""Why route by tenant: adapter-cache hit rate of round-robin vs tenant-hash routing.

    python bench/affinity_sim.py [--tenants 1000] [--requests 100000] [--zipf-s 1.0] [--smoke]

A simulation, not a measurement: N replicas, each with M device adapter slots (LRU); every request
names one tenant's adapter, tenants drawn zipf(s) from `--tenants`. Routing:

  round-robin   request i goes to replica i mod N (what a plain L4/L7 balancer does)
  tenant-hash   consistent hashing of the tenant onto a ring of virtual nodes (Envoy ring_hash on
                the x-tenant header), so each tenant's adapter lives on one replica
  hash+bound    the same with bounded load (Envoy's hash_balance_factor = 150): a replica holding more
                than 1.5x the mean of the requests in flight is skipped for the next one on the ring;
                in flight = the last `--in-flight` requests per replica (a stand-in for concurrency)

It prints the device-slot hit rate of each, the ratio of miss rates round-robin / tenant-hash
(adapter loads avoided), and the busiest replica's requests over the mean: the price of affinity
is that the hottest tenants each land on one replica, and bounded load is what caps it.
--smoke: 200 tenants, 5,000 requests (a second; `make test` runs it).
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import random
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.traffic import Zipf  # noqa: E402

CONFIGS = [(2, 32), (4, 32), (8, 32), (4, 64), (8, 64), (16, 64)]   # (replicas N, device slots M)


class LRU:
    def __init__(self, slots: int):
        self.slots, self.items = slots, OrderedDict()

    def access(self, key: int) -> bool:
        """True on a hit; a miss loads the key, evicting the least recently used."""
        if key in self.items:
            self.items.move_to_end(key)
            return True
        self.items[key] = None
        if len(self.items) > self.slots:
            self.items.popitem(last=False)
        return False


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """Consistent hashing with `vnodes` points per replica (ketama style, like Envoy's ring_hash)."""

    def __init__(self, replicas: int, vnodes: int = 128):
        points = sorted((_h64(f"replica-{r}#{v}"), r) for r in range(replicas) for v in range(vnodes))
        self.keys = [k for k, _ in points]
        self.owner = [r for _, r in points]

    def route(self, tenant: int) -> int:
        i = bisect.bisect(self.keys, _h64(f"tenant-{tenant}")) % len(self.keys)
        return self.owner[i]

    def walk(self, tenant: int):
        """Replicas in ring order from the tenant's point (each once)."""
        start = bisect.bisect(self.keys, _h64(f"tenant-{tenant}"))
        seen = set()
        for j in range(len(self.keys)):
            r = self.owner[(start + j) % len(self.keys)]
            if r not in seen:
                seen.add(r)
                yield r


class BoundedRing:
    """Consistent hashing with bounded load over a sliding window of in-flight requests."""

    def __init__(self, ring: Ring, replicas: int, window: int, factor: float = 1.5):
        self.ring, self.window = ring, window
        self.cap = max(1, int(factor * window / replicas))
        self.recent: deque[int] = deque()
        self.inflight = [0] * replicas

    def route(self, tenant: int) -> int:
        if len(self.recent) == self.window:
            self.inflight[self.recent.popleft()] -= 1
        r = next((r for r in self.ring.walk(tenant) if self.inflight[r] < self.cap), self.ring.route(tenant))
        self.recent.append(r)
        self.inflight[r] += 1
        return r


def simulate(trace: list[int], replicas: int, slots: int, route) -> tuple[float, float]:
    """(hit rate, busiest replica's requests / mean) for one routing function."""
    caches = [LRU(slots) for _ in range(replicas)]
    load = [0] * replicas
    hits = 0
    for i, tenant in enumerate(trace):
        r = route(i, tenant)
        load[r] += 1
        hits += caches[r].access(tenant)
    return hits / len(trace), max(load) / (len(trace) / replicas)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--zipf-s", type=float, default=1.0, help="zipf exponent of tenant popularity")
    p.add_argument("--in-flight", type=int, default=32, help="requests in flight per replica (bounded load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="200 tenants, 5,000 requests: checks it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.tenants, args.requests = 200, 5000

    t0 = time.perf_counter()
    zipf = Zipf(args.tenants, args.zipf_s, random.Random(args.seed))
    # tenant ids are shuffled so that popularity and hash position are unrelated
    ids = list(range(args.tenants))
    random.Random(args.seed + 1).shuffle(ids)
    trace = [ids[zipf.draw()] for _ in range(args.requests)]
    print(f"{args.requests} requests, {args.tenants} tenants, zipf s={args.zipf_s:g}; device-slot hit rate "
          f"(LRU per replica)\n")
    print(f"{'':>15} {'hit rate':^38} {'misses':>7} {'busiest replica / mean':^30}")
    print(f"{'replicas':>8} {'slots':>6} {'round-robin':>12} {'tenant-hash':>12} {'hash+bound':>12} {'rr/hash':>7} "
          f"{'round-robin':>12} {'tenant-hash':>12} {'hash+bound':>11}")
    ratios = []
    for n, m in CONFIGS:
        ring = Ring(n)
        bounded = BoundedRing(ring, n, args.in_flight * n)
        rr_counter = itertools.count()
        rr_hit, rr_load = simulate(trace, n, m, lambda i, t: next(rr_counter) % n)
        ch_hit, ch_load = simulate(trace, n, m, lambda i, t: ring.route(t))
        bd_hit, bd_load = simulate(trace, n, m, lambda i, t: bounded.route(t))
        ratio = (1 - rr_hit) / max(1 - ch_hit, 1e-9)
        ratios.append(f"{n}x{m} = {ratio:.1f}")
        print(f"{n:>8} {m:>6} {rr_hit:>12.1%} {ch_hit:>12.1%} {bd_hit:>12.1%} {ratio:>6.1f}x "
              f"{rr_load:>12.2f} {ch_load:>12.2f} {bd_load:>11.2f}")
    print(f"\nratio: round-robin misses / tenant-hash misses, replicas x slots: {', '.join(ratios)}")
    print(f"({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
