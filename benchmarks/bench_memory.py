"""Benchmark of the memory layer: translate, small reads and writes, dirty
marks, leases. Run: ``python benchmarks/bench_memory.py``.

Every operation is timed next to a reference doing the same job by hand on
the same mmap (memoryview slicing, struct.pack_into, a bytearray OR, a
lock), alternating the two over several rounds and keeping each one's best
round: these machines are noisy, so read the ratios, not the absolute rates.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vubackend._native import AtomicView
from vubackend.bitmap import DirtyLog, DirtyLogSlot, RegionBitmap
from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    GuestMemoryAtomic,
    MmapBackend,
    RegionDescriptor,
)

ROUNDS = 3
ROUND_SECONDS = 0.015
REGION = 1 << 20  # two adjacent 1 MiB regions: GPA [0, 2 MiB)
U32 = struct.Struct("<I")
PAYLOAD = os.urandom(64)


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[[], object]
    reference_name: str
    reference: Callable[[], object]


def per_second(operation: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        operation()
    return count / (time.perf_counter() - start)


def calibrate(operation: Callable[[], object]) -> int:
    count = 100
    while True:
        start = time.perf_counter()
        for _ in range(count):
            operation()
        if time.perf_counter() - start > ROUND_SECONDS / 2:
            return count * 2
        count *= 4


def measure(case: Case) -> tuple[float, float]:
    ours_count, ref_count = calibrate(case.ours), calibrate(case.reference)
    best_ours = best_ref = 0.0
    for _ in range(ROUNDS):  # alternate: both see the same slow periods
        best_ours = max(best_ours, per_second(case.ours, ours_count))
        best_ref = max(best_ref, per_second(case.reference, ref_count))
    return best_ours, best_ref


def descriptor(fd: int, gpa: int, offset: int) -> RegionDescriptor:
    return RegionDescriptor(
        gpa=GuestAddress(gpa),
        size=REGION,
        frontend_addr=FrontendAddress(0x7F00_0000_0000 + gpa),
        mmap_offset=offset,
        fd=fd,
    )


def main() -> None:
    fd = os.memfd_create("vubackend-bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * REGION)
    plain = GuestMemory.map([descriptor(fd, 0, 0), descriptor(fd, REGION, REGION)])
    native = GuestMemory.map(
        [descriptor(fd, 0, 0), descriptor(fd, REGION, REGION)],
        MmapBackend(native_copies=True),
    )
    log_buf = bytearray(2 * REGION // 4096 // 8)
    slot = DirtyLogSlot(DirtyLog(bytearray(len(log_buf))))
    logged = GuestMemory.map(
        [descriptor(fd, 0, 0), descriptor(fd, REGION, REGION)], log=slot
    )
    atomic = GuestMemoryAtomic(
        GuestMemory.map([descriptor(fd, 0, 0), descriptor(fd, REGION, REGION)])
    )
    region_bitmap = RegionBitmap(slot, REGION)
    bare_log = DirtyLog(bytearray(len(log_buf)))

    # The references work on the same mapping, by hand.
    view = plain.regions[0].view
    atomic_view = AtomicView(bytearray(len(log_buf)))
    lock = threading.Lock()

    gpa = GuestAddress(0x1234)
    edge = GuestAddress(REGION - 32)  # 64 bytes across the two regions

    def ref_slice() -> memoryview:
        return view[0x1234 : 0x1234 + 64]

    def ref_read_u32() -> int:
        value: int = U32.unpack_from(view, 0x1234)[0]
        return value

    def ref_write_u32() -> None:
        U32.pack_into(view, 0x1234, 0xDEADBEEF)

    def ref_read64() -> bytes:
        return view[0x1234 : 0x1234 + 64].tobytes()

    def ref_write64() -> None:
        view[0x1234 : 0x1234 + 64] = PAYLOAD

    def ref_mark() -> None:
        page = 0x101234 >> 12
        log_buf[page >> 3] |= 1 << (page & 7)  # not atomic, no fence

    def ref_atomic_or() -> int:
        page = 0x101234 >> 12
        return atomic_view.or_u8(page >> 3, 1 << (page & 7))

    def ref_lock() -> None:
        with lock:
            pass

    def lease() -> None:
        with atomic.memory():
            pass

    cases = [
        Case(
            "translate 64 B",
            lambda: plain.translate(gpa, 64),
            "memoryview slice",
            ref_slice,
        ),
        Case(
            "translate 64 B, 2 regions",
            lambda: plain.translate(edge, 64),
            "memoryview slice",
            ref_slice,
        ),
        Case(
            "read_u32", lambda: plain.read_u32(gpa), "struct.unpack_from", ref_read_u32
        ),
        Case(
            "write_u32 (no log)",
            lambda: plain.write_u32(gpa, 0xDEADBEEF),
            "struct.pack_into",
            ref_write_u32,
        ),
        Case(
            "write_u32 (logging)",
            lambda: logged.write_u32(gpa, 0xDEADBEEF),
            "struct.pack_into",
            ref_write_u32,
        ),
        Case("read 64 B", lambda: plain.read(gpa, 64), "slice.tobytes()", ref_read64),
        Case(
            "read 64 B (native copy)",
            lambda: native.read(gpa, 64),
            "slice.tobytes()",
            ref_read64,
        ),
        Case(
            "write 64 B (no log)",
            lambda: plain.write(gpa, PAYLOAD),
            "slice assignment",
            ref_write64,
        ),
        Case(
            "write 64 B (native copy)",
            lambda: native.write(gpa, PAYLOAD),
            "slice assignment",
            ref_write64,
        ),
        Case(
            "write 64 B (logging)",
            lambda: logged.write(gpa, PAYLOAD),
            "slice assignment",
            ref_write64,
        ),
        Case(
            "DirtyLog.mark_dirty",
            lambda: bare_log.mark_dirty(0x101234, 64),
            "bytearray |= (no atomic)",
            ref_mark,
        ),
        Case(
            "DirtyLog.mark_dirty",
            lambda: bare_log.mark_dirty(0x101234, 64),
            "AtomicView.or_u8 alone",
            ref_atomic_or,
        ),
        Case(
            "RegionBitmap.mark_dirty",
            lambda: region_bitmap.mark_dirty(0x1234, 64),
            "bytearray |= (no atomic)",
            ref_mark,
        ),
        Case("GuestMemoryAtomic lease", lease, "with Lock()", ref_lock),
    ]

    started = time.perf_counter()
    print(f"{'operation':28} {'ops/s':>12}  {'reference':26} {'ops/s':>12}  ratio")
    for case in cases:
        ours, reference = measure(case)
        print(
            f"{case.name:28} {ours:12,.0f}  {case.reference_name:26} "
            f"{reference:12,.0f}  {ours / reference:5.2f}"
        )
    print(
        f"(ratio = ours / reference; best of {ROUNDS} alternating rounds; "
        f"{time.perf_counter() - started:.1f} s)"
    )

    atomic_view.release()
    atomic.close()
    for memory in (plain, native, logged):
        memory.close()
    slot.close()
    bare_log.close()
    os.close(fd)


if __name__ == "__main__":
    main()
