"""Benchmark of the virtqueue data path: descriptor chains per second.

Rules: ratios, not absolute times (docs/design.md, "Performance"). For split
and packed rings, chains of 1 and 4 descriptors, with and without
EVENT_IDX, the device side (pop every available chain, return them all in
one batch, decide whether to interrupt) runs on the native batch path and on
the pure-Python reference path, alternating, in the same process; the table
gives chains per second for each and the ratio native / Python. Only the
device side is timed: the driver (a replay that republishes a full ring
between rounds) is not.

Run it with ``python benchmarks/bench_vring.py [--seconds S] [--size N]``.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from dataclasses import dataclass

from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemoryAtomic,
    RegionDescriptor,
)
from vubackend.vring import QueueFeatures, VringState, packed_layout, split_layout

_MEM_SIZE = 4 << 20
_RING = 0x1000
_DATA = 0x100000
_DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next
_PDESC = struct.Struct("<QIHH")  # packed: addr, len, id, flags
_F_NEXT = 1
_F_WRITE = 2
_P_AVAIL = 1 << 7
_P_USED = 1 << 15


@dataclass(frozen=True)
class _Case:
    packed: bool
    descriptors: int
    event_idx: bool

    @property
    def name(self) -> str:
        kind = "packed" if self.packed else "split"
        event = "event_idx" if self.event_idx else "-"
        return f"{kind:6} {self.descriptors} desc  {event:9}"


class _Bench:
    """One queue, a replaying driver, and a loop that times the device side.

    The driver is a replay: every round offers the same chains, so the
    descriptors are written once and a round only republishes them (split:
    one store of ``avail.idx``; packed: the ring image of the next lap, with
    the AVAIL/USED bits of its wrap counter). The device sees a fresh full
    ring every round, exactly as if a driver had refilled it.
    """

    def __init__(
        self, atomic: GuestMemoryAtomic, case: _Case, size: int, native: bool
    ) -> None:
        self.case = case
        self.size = size
        self.state = VringState(atomic, size, native=native)
        self.state.set_queue_features(
            QueueFeatures(packed=case.packed, event_idx=case.event_idx)
        )
        self.state.set_queue_size(size)
        self._guard = atomic.memory()
        mem = self._guard.memory
        ring = _RING if native else _RING + 0x80000  # each its own ring
        layout = packed_layout if case.packed else split_layout
        desc, avail, used, _ = layout(ring, size)
        self.state.set_queue_info(desc, avail, used)
        self.state.set_queue_ready(True)
        n = case.descriptors
        self.per_round = size // n
        # Chain c: descriptors (slots) c*n .. c*n+n-1; readable buffers first,
        # one writable buffer last (a request and its status, as virtio-blk).
        region, self._desc_off = mem.locate(GuestAddress(desc), 16 * size)
        self._view = region.view
        self._atomic = region.atomic
        if case.packed:
            self._images = [self._packed_image(wrap) for wrap in (0, 1)]
            self._wrap = 1
        else:
            image = bytearray()
            for c in range(self.per_round):
                for k in range(n):
                    last = k == n - 1
                    flags = _F_WRITE if last else _F_NEXT
                    nxt = 0 if last else c * n + k + 1
                    image += _DESC.pack(_DATA + 0x1000 * k, 512, flags, nxt)
            self._view[self._desc_off : self._desc_off + len(image)] = image
            a_region, a_off = mem.locate(GuestAddress(avail), 4 + 2 * size)
            for p in range(size):
                struct.pack_into(
                    "<H", a_region.view, a_off + 4 + 2 * p, (p % self.per_round) * n
                )
            self._avail_atomic = a_region.atomic
            self._avail_idx_off = a_off + 2
            self._avail_idx = 0

    def _packed_image(self, wrap: int) -> bytes:
        n = self.case.descriptors
        avail = _P_AVAIL if wrap else _P_USED
        image = bytearray()
        for c in range(self.per_round):
            for k in range(n):
                last = k == n - 1
                flags = avail | (_F_WRITE if last else _F_NEXT)
                image += _PDESC.pack(_DATA + 0x1000 * k, 512, c, flags)
        return bytes(image)

    def publish(self) -> None:
        if self.case.packed:
            image = self._images[self._wrap]
            self._view[self._desc_off : self._desc_off + len(image)] = image
            self._wrap ^= 1
        else:
            self._avail_idx = (self._avail_idx + self.per_round) & 0xFFFF
            # ORDERING: release store of avail.idx (the replaying driver).
            self._atomic_store_avail()

    def _atomic_store_avail(self) -> None:
        self._avail_atomic.store_u16(self._avail_idx_off, self._avail_idx)

    def round(self) -> tuple[int, float]:
        """Offer a full ring, then time the device draining it."""
        self.publish()
        state = self.state
        start = time.perf_counter()
        chains = state.pop_chains()
        state.add_used_many([(c.head, 0) for c in chains])
        state.needs_notification()
        elapsed = time.perf_counter() - start
        if len(chains) != self.per_round:
            raise AssertionError(f"popped {len(chains)}, expected {self.per_round}")
        return len(chains), elapsed

    def close(self) -> None:
        self.state.close()
        self._guard.release()


def _memory(fd: int) -> GuestMemoryAtomic:
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table(
        [
            RegionDescriptor(
                gpa=GuestAddress(0),
                size=_MEM_SIZE,
                frontend_addr=FrontendAddress(0x7F00_0000_0000),
                mmap_offset=0,
                fd=fd,
            )
        ]
    )
    return atomic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=0.4, help="device time per case"
    )
    parser.add_argument("--size", type=int, default=256, help="queue size (256)")
    args = parser.parse_args(argv)

    fd = os.memfd_create("bench-vring", os.MFD_CLOEXEC)
    os.ftruncate(fd, _MEM_SIZE)
    atomic = _memory(fd)
    cases = [
        _Case(packed, descriptors, event_idx)
        for packed in (False, True)
        for descriptors in (1, 4)
        for event_idx in (False, True)
    ]
    print(f"queue size {args.size}; device side: pop all, add_used batch, notify check")
    print(f"{'case':28} {'native chains/s':>16} {'python chains/s':>16} {'ratio':>7}")
    for case in cases:
        benches = {
            native: _Bench(atomic, case, args.size, native) for native in (True, False)
        }
        chains = {True: 0, False: 0}
        spent = {True: 0.0, False: 0.0}
        for bench in benches.values():
            bench.round()  # warm up (binding, first allocation)
        # Alternate the two paths so that a slow period of the machine hits
        # both (docs/design.md: compare only within one run, alternating),
        # round for round, until the slower one has used its time.
        while max(spent.values()) < args.seconds:
            for native, bench in benches.items():
                n, t = bench.round()
                chains[native] += n
                spent[native] += t
        rate = {k: chains[k] / spent[k] for k in (True, False)}
        print(
            f"{case.name:28} {rate[True]:16,.0f} {rate[False]:16,.0f} "
            f"{rate[True] / rate[False]:6.1f}x"
        )
        for bench in benches.values():
            bench.close()
    atomic.close()
    os.close(fd)


if __name__ == "__main__":
    main()
