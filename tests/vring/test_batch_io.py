"""Frames into whole batches: ChainBatch.fill (one frame per chain, after a
prefix) and ChainBatch.forward (frames from one queue's chains into
another's), completed with add_used_batch; split and packed rings, across
buffers and regions, chains too small, the dirty log, and batches walked
against different memory tables."""

from __future__ import annotations

import os
from array import array
from typing import TYPE_CHECKING

import pytest

from vubackend._native import TableReleasedError
from vubackend.bitmap import DirtyLog
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import ChainBatch, _batch_io

from ._support import DATA, REGIONS, RING_BASE, SPAN, Harness
from .conftest import MakeHarness
from .test_chain import descriptor_for, pages

if TYPE_CHECKING:
    from typing_extensions import Buffer

PREFIX = b"H" * 12
R2_DATA = 0x100000
# Receive buffers: one plain, one in two descriptors across R0/R1, one too
# small for a 64-byte frame, one plain.
RX = [
    [(DATA, 0x80, True)],
    [(DATA + 0x200, 0x20, True), (SPAN - 0x10, 0x100, True)],
    [(DATA + 0x400, 0x30, True)],
    [(DATA + 0x600, 0x80, True)],
]


def one_batch(h: Harness) -> ChainBatch:
    [batch] = h.state.pop_batches()
    return batch


def gather(h: Harness, buffers: list[tuple[int, int, bool]], n: int) -> bytes:
    out = b"".join(h.read(gpa, size) for gpa, size, _ in buffers)
    return out[:n]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_fill_writes_one_frame_per_chain_after_the_prefix(
    harness: MakeHarness, packed: bool, native: bool
) -> None:
    h = harness(packed=packed, native=native, event_idx=True)
    heads = [h.driver.add(buffers) for buffers in RX]
    frames = [os.urandom(64) for _ in RX]
    batch = one_batch(h)
    used = batch.fill(frames, PREFIX)
    # The third chain (0x30 bytes) cannot hold 12 + 64: the fill stops there.
    assert list(used) == [76, 76]
    for buffers, frame in zip(RX[:2], frames, strict=False):
        assert gather(h, buffers, 76) == PREFIX + frame
    assert h.read(DATA + 0x400, 0x30) == bytes(0x30), "nothing in the small one"
    # The rest: the small chain takes a short frame, the last one its own.
    more = batch.fill([b"s" * 8, frames[3]], PREFIX, start=2)
    assert list(more) == [20, 76]
    assert gather(h, RX[3], 76) == PREFIX + frames[3]
    assert h.state.add_used_batch(batch, 2, used) in (True, False)
    h.state.add_used_batch(batch, length=more, first=2)
    assert h.driver.collect() == list(zip(heads, [76, 76, 20, 76], strict=True))


def test_fill_with_no_room_or_no_frames_fills_nothing(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True)
    h.driver.add([(DATA, 0x8, True)])
    batch = one_batch(h)
    assert list(batch.fill([b"x" * 9])) == []
    assert list(batch.fill([])) == []
    assert list(batch.fill([b"x"], start=1)) == []
    assert h.read(DATA, 8) == bytes(8)


def test_fill_takes_any_buffer(harness: MakeHarness) -> None:
    """Frames are sized in bytes, whatever their item size."""
    h = harness(packed=False, native=True)
    for buffers in RX[:3]:
        h.driver.add(buffers)
    wide = array("H", [0x4142] * 4)
    frames: list[Buffer] = [bytearray(b"ab"), memoryview(wide), array("B", b"xyz")]
    assert list(one_batch(h).fill(frames)) == [2, 8, 3]
    assert h.read(DATA, 2) == b"ab"
    assert gather(h, RX[1], 8) == wide.tobytes()
    assert h.read(DATA + 0x400, 3) == b"xyz"


def test_fill_marks_the_dirty_log(
    harness: MakeHarness, atomic: GuestMemoryAtomic
) -> None:
    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    h = harness(packed=False, native=True)
    h.driver.add(RX[1])
    assert list(one_batch(h).fill([b"f" * 0x20], PREFIX)) == [0x2C]
    # 0x20 bytes at DATA + 0x200 (page 0x20), the rest at SPAN - 0x10 (0x3F).
    assert pages(log_buf) == {0x20, 0x3F}
    # Regions that do not share one log slot: marked chain by chain, through
    # each region's bitmap, with the same result.
    log_buf[:] = bytes(len(log_buf))
    h.driver.add(RX[1])
    batch = one_batch(h)
    batch._slot = None
    assert list(batch.fill([b"g" * 8], PREFIX)) == [20]
    assert pages(log_buf) == {0x20}


def test_forward_marks_the_dirty_log(atomic: GuestMemoryAtomic) -> None:
    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    tx, rx = two_rings(atomic, packed=False)
    try:
        transmit(tx, [os.urandom(40)])
        rx.driver.add(RX[1])
        log_buf[:] = bytes(len(log_buf))  # what the driver wrote is not ours
        used = one_batch(rx).forward(one_batch(tx), 1, skip=12, prefix=PREFIX)
        assert list(used) == [52]
        assert pages(log_buf) == {0x20, 0x3F}
    finally:
        tx.close()
        rx.close()


def two_rings(atomic: GuestMemoryAtomic, packed: bool) -> tuple[Harness, Harness]:
    tx = Harness(atomic, packed=packed, native=True, event_idx=True, base=RING_BASE)
    rx = Harness(
        atomic, packed=packed, native=True, event_idx=True, base=RING_BASE + 0x8000
    )
    return tx, rx


def transmit(tx: Harness, frames: list[bytes]) -> list[int]:
    """TX chains: a 12-byte header, then the frame in two descriptors (the
    second in R2)."""
    heads = []
    for k, frame in enumerate(frames):
        at, tail = DATA + 0x1000 + 0x100 * k, R2_DATA + 0x100 * k
        tx.write(at, b"T" * 12 + frame[:10])
        tx.write(tail, frame[10:])
        buffers = [(at, 12 + min(len(frame), 10), False)]
        if len(frame) > 10:
            buffers.append((tail, len(frame) - 10, False))
        heads.append(tx.driver.add(buffers))
    return heads


def per_chain_only(*_: object) -> int:
    raise TableReleasedError("forced: the per-chain path")


def native_only(*_: object) -> array[int]:
    raise AssertionError("the per-chain path was taken")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("path", ["native", "per-chain"])
def test_forward_passes_frames_from_one_queue_to_another(
    atomic: GuestMemoryAtomic, packed: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths give the same result; two rings of one snapshot pin two
    tables, and the native path still serves them."""
    if path == "native":
        monkeypatch.setattr(_batch_io, "_forward_by_chains", native_only)
    else:
        monkeypatch.setattr(_batch_io, "chains_forward", per_chain_only)
    tx, rx = two_rings(atomic, packed)
    try:
        frames = [os.urandom(64), os.urandom(20), b"", os.urandom(64)]
        tx_heads = transmit(tx, frames)
        rx_heads = [rx.driver.add(buffers) for buffers in RX]
        src, dst = one_batch(tx), one_batch(rx)
        used = dst.forward(src, 4, skip=12, prefix=PREFIX)
        assert list(used) == [76, 32], "the third frame is empty: it stops there"
        assert gather(rx, RX[0], 76) == PREFIX + frames[0]
        assert gather(rx, RX[1], 32) == PREFIX + frames[1]
        # The fourth frame, into the last chain.
        assert list(dst.forward(src, 1, start=3, src_start=3, skip=12)) == [64]
        assert gather(rx, RX[3], 64) == frames[3]
        tx.state.add_used_batch(src)
        rx.state.add_used_batch(dst, 2, used)
        rx.state.add_used_batch(dst, 1, 64, first=3)
        assert tx.driver.collect() == [(head, 0) for head in tx_heads]
        assert rx.driver.collect() == [
            (rx_heads[0], 76),
            (rx_heads[1], 32),
            (rx_heads[3], 64),
        ]
    finally:
        tx.close()
        rx.close()


def test_forward_between_batches_of_different_snapshots(
    atomic: GuestMemoryAtomic, memfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory update between the two pops: the batches' region indices
    need not agree, so the frames go chain by chain, with the same
    result."""
    monkeypatch.setattr(_batch_io, "chains_forward", native_only)
    tx, rx = two_rings(atomic, packed=False)
    try:
        frames = [os.urandom(64), os.urandom(40)]
        transmit(tx, frames)
        src = one_batch(tx)
        atomic.set_mem_table(
            [descriptor_for(memfd, gpa, size, off) for gpa, size, off in REGIONS]
        )
        rx.state.set_queue_info(rx.desc, rx.avail, rx.used)
        for buffers in RX[:2]:
            rx.driver.add(buffers)
        dst = one_batch(rx)
        assert dst.regions is not src.regions
        assert list(dst.forward(src, 2, skip=12, prefix=PREFIX)) == [76, 52]
        assert gather(rx, RX[0], 76) == PREFIX + frames[0]
        assert gather(rx, RX[1], 52) == PREFIX + frames[1]
    finally:
        tx.close()
        rx.close()


def test_add_used_batch_checks_before_writing(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True)
    head = h.driver.add([(DATA, 0x10, True)])
    batch = one_batch(h)
    with pytest.raises(ValueError):
        h.state.add_used_batch(batch, 1, array("I", [0x11]))  # more than it has
    with pytest.raises(ValueError):
        h.state.add_used_batch(batch, 2)  # not in the batch
    assert h.driver.collect() == []
    h.state.add_used_batch(batch, 1, array("I", [0x10]))
    assert h.driver.collect() == [(head, 0x10)]
    with pytest.raises(ValueError):
        h.state.add_used_batch(batch)  # already used
