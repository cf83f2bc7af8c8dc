"""micro scenario of ``python -m benchmarks``: chains per second popped and
completed in-process (pop every available chain, complete them in one
batch, decide whether to interrupt), split and packed rings, one and four
descriptors per chain; ours is the native batch path, the reference the
pure-Python walk of the same rings (bench_vring.py holds the replaying
driver)."""

from __future__ import annotations

import functools
import os

from benchmarks._harness import Metrics, Scenario
from benchmarks.bench_vring import _MEM_SIZE, _Bench, _Case, _memory


def _side(bench: _Bench, seconds: float) -> Metrics:
    bench.round()  # warm up
    chains, spent = 0, 0.0
    while spent < seconds:
        n, t = bench.round()
        chains += n
        spent += t
    return {"chains_per_s": chains / spent}


def scenarios(*, seconds: float = 0.3, size: int = 256) -> list[Scenario]:
    made: list[Scenario] = []
    for packed in (False, True):
        for descriptors in (1, 4):
            # Each case its own memory: the benches of a case share ring
            # addresses with those of the others.
            fd = os.memfd_create("bench-micro", os.MFD_CLOEXEC)
            os.ftruncate(fd, _MEM_SIZE)
            atomic = _memory(fd)
            case = _Case(packed, descriptors, event_idx=True)
            benches = {
                native: _Bench(atomic, case, size, native) for native in (True, False)
            }

            made.append(
                Scenario(
                    f"micro {'packed' if packed else 'split'} {descriptors} desc",
                    functools.partial(_side, benches[True], seconds),
                    functools.partial(_side, benches[False], seconds),
                    ["chains_per_s"],
                    "pure-Python path",
                )
            )
    return made
