# Frames into many chains of a batch at once (ChainBatch.fill and
# ChainBatch.forward): the receive side of a network device, one native call
# per batch instead of Python work per frame.
#
# Rules of this module:
# - One frame per chain, from the first chain asked for on; the first frame
#   a chain cannot hold ends the call (nothing is written into that chain),
#   so that the device can hand it to its general path (merged buffers,
#   drops) and come back.
# - The native calls need the batch's pinned region table. forward reads
#   both batches through the destination's: each ring pins its own table,
#   but tables of one snapshot list the same regions in the same order, so
#   a segment's region index means the same in both. A snapshot with
#   regions mapped on demand, or two batches of different snapshots (a
#   memory update came in between), take the per-chain path, which gives
#   the same result.
# - What the chains got is marked in the dirty log while the driver logs,
#   after the copy: in one native call for the batch when every region
#   marks the session's log slot, else chain by chain through the regions'
#   bitmaps (as DescriptorChain.write does).

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vubackend._native import TableReleasedError, chains_fill, chains_forward

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vubackend._native import RegionTable
    from vubackend.vring._chain import ChainBatch

__all__ = ["fill", "forward"]


def _mark(batch: ChainBatch, table: RegionTable, start: int, used: array[int]) -> None:
    # Chains [start, start + len(used)) of the batch got used[k] bytes each.
    slot = batch._slot
    if slot is None:
        for chain, n in zip(batch.chains()[start:], used, strict=False):
            chain.mark_written(n)
    elif slot.current is not None:
        segs, nsegs = batch._seg_ptr or batch._pin(), batch._nsegs
        records = batch._records()
        try:
            slot.mark_chains(table, segs, nsegs, records, start, len(used), used)
        except TableReleasedError:
            # Released since the copy (a memory update): the bytes are
            # there and must be logged; the batch pins its own regions.
            table = batch._repin()
            slot.mark_chains(table, segs, nsegs, records, start, len(used), used)


def fill(
    batch: ChainBatch, frames: Sequence[Buffer], prefix: bytes, start: int
) -> array[int]:
    """ChainBatch.fill: see there."""
    count = min(len(frames), len(batch) - start)
    if start < 0 or count <= 0:
        return array("I")
    table = batch._table
    if table is None:
        return _fill_by_chains(batch, frames, prefix, start, count)
    blob = b"".join(frames[:count])
    # len() is a frame's size unless its items are wider than a byte, which
    # the total then shows.
    lengths = array("I", map(len, frames[:count]))  # type: ignore[arg-type]
    if sum(lengths) != len(blob):
        lengths = array("I", [memoryview(f).nbytes for f in frames[:count]])
    used = array("I", bytes(4 * count))
    segs = batch._seg_ptr or batch._pin()
    try:
        done = chains_fill(
            table, segs, batch._nsegs, batch._records(), start, count, prefix, blob,
            lengths, used,
        )  # fmt: skip
    except TableReleasedError:
        table = batch._repin()
        done = chains_fill(
            table, segs, batch._nsegs, batch._records(), start, count, prefix, blob,
            lengths, used,
        )  # fmt: skip
    del used[done:]
    _mark(batch, table, start, used)
    return used


def _fill_by_chains(
    batch: ChainBatch, frames: Sequence[Buffer], prefix: bytes, start: int, count: int
) -> array[int]:
    used = array("I")
    for chain, frame in zip(
        batch.chains()[start : start + count], frames, strict=False
    ):
        data = memoryview(frame).cast("B")
        if chain.writable_len < len(prefix) + len(data):
            break
        chain.write(prefix)
        chain.write(data)
        used.append(chain.bytes_written)
    return used


def forward(
    dst: ChainBatch,
    src: ChainBatch,
    count: int,
    start: int,
    src_start: int,
    skip: int,
    prefix: bytes,
) -> array[int]:
    """ChainBatch.forward: see there."""
    count = min(count, len(dst) - start, len(src) - src_start)
    if start < 0 or src_start < 0 or skip < 0 or count <= 0:
        return array("I")
    table = dst._table
    if table is None or src._table is None or src.regions is not dst.regions:
        return _forward_by_chains(dst, src, count, start, src_start, skip, prefix)
    used = array("I", bytes(4 * count))
    sides = (
        (src._seg_ptr or src._pin(), src._nsegs, src._records(), src_start),
        (dst._seg_ptr or dst._pin(), dst._nsegs, dst._records(), start),
    )
    try:
        done = chains_forward(table, sides[0], sides[1], count, skip, prefix, used)
    except TableReleasedError:
        # The destination's ring moved to another snapshot meanwhile: go
        # through each chain's own view of its regions.
        return _forward_by_chains(dst, src, count, start, src_start, skip, prefix)
    del used[done:]
    _mark(dst, table, start, used)
    return used


def _forward_by_chains(
    dst: ChainBatch,
    src: ChainBatch,
    count: int,
    start: int,
    src_start: int,
    skip: int,
    prefix: bytes,
) -> array[int]:
    used = array("I")
    pairs = zip(
        dst.chains()[start : start + count],
        src.chains()[src_start : src_start + count],
        strict=True,
    )
    for to, source in pairs:
        frame = source.readable_len - skip
        if frame <= 0 or to.writable_len < len(prefix) + frame:
            break
        source.read(skip)
        to.write(prefix)
        to.write(source.read(frame))
        used.append(to.bytes_written)
    return used
