"""Which threads run torch's parallel CPU ops: the engine's, alone.

libgomp (the OpenMP runtime torch's wheels load) gives every thread that starts a parallel op a team
of its own, kept until that thread exits. Once the process holds more OpenMP threads than it has
cores (the main thread's team from loading the model, plus the engine thread's), libgomp throttles
every barrier's spin to ~100 iterations (`gomp_throttled_spin_count_var`), so each small op of a
step ends in a futex wake-up: measured on the bench CPU (2 cores), the same ops on a second thread
after the main thread had used its team: index_add_ of 32 x 1536 floats 9.6 -> 170 us, a multiply
4 -> 41 us, the adapter bmm 44 -> 84 us; a SmolLM2 decode step on 32 LoRAs 1.3 ms per packed LoRA
op instead of 0.5 (issue 24). So the server keeps one team: the engine thread's (`engine_team`, at
the start of its loop), the main thread frees its own once the model is loaded (`release_team`), and
every other thread that may touch a tensor (the event loop's worker pool: uploads' validation, store
scans) runs OpenMP single-threaded (`serial`), which starts no team.
"""
from __future__ import annotations

import ctypes
import logging
from functools import cache

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1        # omp_pause_resource_t: free the threads, keep the runtime


def engine_team(threads: int) -> None:
    """The calling thread (the engine's) runs torch ops on `threads` threads: its own team."""
    torch.set_num_threads(threads)


def serial() -> bool:
    """The calling thread runs torch's OpenMP ops on one thread and so never starts a team (the
    initializer of helper thread pools, the main thread once the engine runs). Only this thread's
    OpenMP setting changes: `torch.set_num_threads(1)` here would also reset process-wide state that
    the engine thread's ops read (measured: SmolLM2 base throughput 150 -> 120 tok/s with the main
    thread set so). False when no libgomp is loaded (nothing changed)."""
    lib = _libgomp()
    if lib is None:
        return False
    torch.get_num_threads()                      # torch's per-thread init first (it sets the count)
    lib.omp_set_num_threads(1)
    return True


def release_team() -> bool:
    """Free the calling thread's idle OpenMP team (OpenMP 5's omp_pause_resource_all), so it no
    longer counts against the cores; a later parallel op on this thread would start a new one (call
    `serial` first). False when no libgomp is loaded or it refuses (then nothing changed)."""
    lib = _libgomp()
    if lib is None:
        return False
    try:
        return lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    except AttributeError:                       # an OpenMP runtime older than 5.0
        return False


@cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (dlopen of a loaded library returns the same one), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            log.debug("cannot open %s", path)
    return None
