# DescriptorChain: one request popped from a virtqueue, as the device sees it.
#
# Rules of this module:
# - A chain is a snapshot. Its descriptors were read once, checked and
#   translated when it was popped (_walk.py or the C walker); what is kept is
#   the list of buffer segments, each inside one memory region. Nothing here
#   reads a descriptor again.
# - Readable segments come first, then writable ones (the walk refused any
#   other order). Reads only touch readable segments, writes only writable
#   ones: chain.write() can never reach guest memory outside the chain's
#   device-writable buffers, whatever it is given (extra data is dropped and
#   the count says so).
# - Bytes move in one GIL-free native call per read, write or file
#   transfer, whatever the number of segments (chain_copy, chain_file_io),
#   through the pinned region table the chain was walked against; a batch
#   whose table was released since (the ring moved to a new memory table)
#   pins its own regions again. Snapshots with regions mapped on demand
#   (Xen grants) have no table: their chains copy piece by piece through
#   MappedRegion. Every write into the chain marks the dirty bitmap after
#   copying (vhost-user-protocol.md §4.7, §5.4 rule 7). Memoryviews from
#   writable_buffers() are raw: whoever writes through them marks the
#   bitmap (mark_written does it for a byte count).
# - Chains popped together share one ChainBatch: the flat record words and
#   segment words of the C layout (native.c: 8 u32 per chain, 2 ints per
#   segment), whichever path produced them. A chain is a batch and an index,
#   so that popping costs one small object per chain and no per-descriptor
#   Python work; the few fields every request reads are copied into it.
# - The per-request methods (read of a header, write, write_from_file,
#   read_to_file) are the data path of every device: they compute little,
#   check with single expressions, and leave messages to the failing path.
# - A chain refers to the memory snapshot it was popped from. Used after that
#   snapshot was unmapped, its reads and writes fail with ValueError from the
#   released views; they never touch freed memory.

from __future__ import annotations

import os
from array import array
from collections.abc import MutableSequence, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Final, NamedTuple, final

from vubackend._native import (
    PEEK_BYTES,
    RegionTable,
    TableReleasedError,
    chain_copy,
    chain_file_io,
    chain_write,
    pin_records,
    pin_segments,
    records_sum,
)
from vubackend.memory import GuestAddress, MappedRegion
from vubackend.vring import _batch_io

if TYPE_CHECKING:
    from cffi import FFI
    from typing_extensions import Buffer

    from vubackend.vring._space import MemorySpace

__all__ = ["ChainBatch", "ChainSegment", "DescriptorChain"]

_LEN_MASK: Final = 0xFFFF_FFFF
_REGION_MASK: Final = 0x7FFF_FFFF


class ChainSegment(NamedTuple):
    """One piece of a chain's buffers, inside one memory region.

    Attributes:
        gpa: guest physical address of the first byte.
        length: bytes.
        writable: whether the device may write it.
    """

    gpa: GuestAddress
    length: int
    writable: bool


@final
class ChainBatch:
    """Chains popped together, without an object per chain: the batch API
    (``pop_batches``) hands these to devices that only need the chains'
    ids and lengths (a sink, a counter), and :meth:`chains` gives the
    :class:`DescriptorChain` objects when the data is needed. The records
    are the C layout (8 words per chain), shared by the chains."""

    __slots__ = (
        "_bitmaps",
        "_nsegs",
        "_peek",
        "_rec_ptr",
        "_seg_ptr",
        "_slot",
        "_table",
        "regions",
        "segs",
        "words",
    )

    def __init__(
        self,
        words: MutableSequence[int],
        segs: MutableSequence[int],
        space: MemorySpace,
        table: RegionTable | None,
        peek: bytes | None = None,
        seg_ptr: FFI.CData | None = None,
    ) -> None:
        # words, segs: lists from the Python walks, arrays (u32 / u64) from
        # the C walks; space: the snapshot's lookup tables; table: the
        # pinned regions they were walked against, None when the snapshot
        # has regions mapped on demand (no native copies then); peek: the
        # first PEEK_BYTES of each chain's readable part, copied by the walk
        # (native walks only); seg_ptr: segs, pinned (pin_segments).
        self.words = words
        self.segs = segs
        self.regions = space.regions
        self._table = table
        self._bitmaps = space.bitmaps
        self._slot = space.log_slot
        self._seg_ptr = seg_ptr
        self._rec_ptr: FFI.CData | None = None
        self._nsegs = len(segs) // 2
        self._peek = peek

    @property
    def native(self) -> bool:
        """Whether the chains' bytes move through the native copies (the
        snapshot has no region mapped on demand)."""
        return self._table is not None

    def _pin(self) -> FFI.CData:
        segs = self.segs
        if not isinstance(segs, array):
            segs = self.segs = array("Q", segs)
        ptr = self._seg_ptr = pin_segments(segs)
        return ptr

    def _repin(self) -> RegionTable:
        # The ring moved on to a new memory table and released the one we
        # were walked against: pin our own regions (ValueError if one was
        # unmapped meanwhile). Nobody else releases this one.
        table = self._table = RegionTable([(r.gpa, r.view) for r in self.regions])
        return table

    def __len__(self) -> int:
        return len(self.words) // 8

    @property
    def heads(self) -> list[int]:
        """The id of each chain, in order (what ``add_used`` takes)."""
        return list(self.words[0::8])

    @property
    def readable_lens(self) -> list[int]:
        """Bytes of each chain's device-readable buffers."""
        return list(self.words[5::8])

    @property
    def writable_lens(self) -> list[int]:
        """Bytes of each chain's device-writable buffers."""
        return list(self.words[6::8])

    def readable_bytes(self, skip: int = 0) -> int:
        """Total bytes of the chains' device-readable buffers, each chain's
        less ``skip`` (a header: a chain shorter than it counts 0), in one
        native call: what a sink or a counter needs without a list of
        lengths."""
        if skip < 0:
            raise ValueError(f"skip {skip} is negative")
        return records_sum(self._records(), len(self.words) // 8, 5, skip)

    def fill(
        self, frames: Sequence[Buffer], prefix: bytes = b"", *, start: int = 0
    ) -> array[int]:
        """Write one frame into each chain's writable part, in one native
        call: chain ``start + k`` gets ``prefix``, then ``frames[k]`` (a
        network device's receive side: the header, then the frame). Stops at
        the first frame its chain cannot hold (nothing is written into that
        chain), or when the frames or the chains run out. Marks the dirty
        bitmap while the driver logs.

        Returns:
            The used length of each chain filled (``len(prefix) +
            len(frame)``), as ``array('I')``: return them with
            ``add_used_batch(batch, len(used), used, first=start)``.

        Raises:
            ValueError: the memory was unmapped since the chains were popped.
        """
        return _batch_io.fill(self, frames, prefix, start)

    def forward(
        self,
        src: ChainBatch,
        count: int,
        *,
        start: int = 0,
        src_start: int = 0,
        skip: int = 0,
        prefix: bytes = b"",
    ) -> array[int]:
        """Pass frames from the chains of ``src`` into these, in one native
        call: chain ``start + k`` gets ``prefix``, then the readable bytes of
        ``src``'s chain ``src_start + k`` after its first ``skip`` (a loopback
        from a transmit queue to a receive queue, header replaced), for ``k``
        up to ``count``. Stops at the first source chain with nothing after
        ``skip``, or whose frame its chain cannot hold. Marks the dirty bitmap
        while the driver logs.

        Returns:
            The used length of each chain filled, as ``array('I')``.

        Raises:
            ValueError: the memory was unmapped since the chains were popped.
        """
        return _batch_io.forward(self, src, count, start, src_start, skip, prefix)

    def _records(self) -> FFI.CData:
        """The chain records, pinned for the native completion (the rings'
        ``complete_batch``)."""
        ptr = self._rec_ptr
        if ptr is None:
            words = self.words
            if not isinstance(words, array):
                words = self.words = array("I", words)
            ptr = self._rec_ptr = pin_records(words)
        return ptr

    def _used_entries(
        self, count: int, length: int | array[int], first: int = 0
    ) -> list[int]:
        """``[head, length, ...]`` for chains ``[first, first + count)``, with
        one used length or one per chain (the rings' Python completion
        path)."""
        if not 0 <= first <= first + count <= len(self.words) // 8:
            raise ValueError(f"chains {first}..{first + count} are not in the batch")
        flat = [0] * (2 * count)
        flat[0::2] = self.words[8 * first : 8 * (first + count) : 8]
        if isinstance(length, int):
            flat[1::2] = [length] * count
        else:
            if len(length) < count:
                raise ValueError(f"{count} chains need {count} used lengths")
            flat[1::2] = length[:count]
        return flat

    @classmethod
    def of(cls, chain: DescriptorChain) -> ChainBatch:
        """A batch of one chain (a copy of its record and segments)."""
        batch, at = chain._batch, chain._at
        record = batch.words[at : at + 8]
        base, nsegs = record[2], record[3]
        record[2] = 0
        copy = cls.__new__(cls)
        copy.words = record
        copy.segs = batch.segs[2 * base : 2 * (base + nsegs)]
        copy.regions = batch.regions
        copy._table = batch._table
        copy._bitmaps = batch._bitmaps
        copy._slot = batch._slot
        copy._seg_ptr = None
        copy._rec_ptr = None
        copy._nsegs = nsegs
        peek = batch._peek
        first = at // 8 * PEEK_BYTES
        copy._peek = None if peek is None else peek[first : first + PEEK_BYTES]
        return copy

    @staticmethod
    def flatten(batches: list[ChainBatch]) -> list[DescriptorChain]:
        """The chains of several batches, in order."""
        if len(batches) == 1:
            return batches[0].chains()
        return [chain for batch in batches for chain in batch.chains()]

    def chains(self) -> list[DescriptorChain]:
        """One chain per record, in order."""
        words = self.words
        if len(words) == 8:
            return [DescriptorChain(self, 0)]
        return list(
            map(DescriptorChain, repeat(self, len(words) // 8), range(0, len(words), 8))
        )


@final
class DescriptorChain:
    """A descriptor chain popped from a virtqueue.

    Made by the queues (``pop_chains``), not by users. Hand it back with
    ``add_used(chain.head, chain.bytes_written)``.

    The readable part (what the driver sent) is read with :meth:`read`,
    :meth:`readinto` and :meth:`read_all`, which advance a read cursor; the
    writable part is filled with :meth:`write`, which advances a write
    cursor; :meth:`write_from_file` and :meth:`read_to_file` move bytes
    between a file and the chain without a copy through Python.
    :meth:`readable_buffers` and :meth:`writable_buffers` give the raw
    memoryviews (they may span several regions, one view per piece).
    """

    __slots__ = (
        "_at",
        "_batch",
        "_rpos",
        "_wpos",
        "head",
        "readable_len",
        "writable_len",
    )

    head: int
    """The id to hand back in ``add_used``: the head descriptor's index
    (split ring) or the buffer id (packed ring). Read-only."""
    readable_len: int
    """Total bytes of the device-readable buffers. Read-only."""
    writable_len: int
    """Total bytes of the device-writable buffers. Read-only."""

    def __init__(self, batch: ChainBatch, at: int) -> None:
        # Private: the queues build chains from checked walks. What every
        # device reads is copied out of the record here (a property per read
        # would cost more); the segment facts (first, count, readable) are
        # read from it where the copies need them (many chains never copy).
        self._batch = batch
        self._at = at
        self._rpos = 0
        self._wpos = 0
        words = batch.words
        self.head = words[at]
        self.readable_len = words[at + 5]
        self.writable_len = words[at + 6]

    def _pieces(self, first: int, last: int) -> list[tuple[MappedRegion, int, int]]:
        # (region, offset, length) of segments [first, last) of this chain.
        batch = self._batch
        base = batch.words[self._at + 2]
        segs = batch.segs
        regions = batch.regions
        out: list[tuple[MappedRegion, int, int]] = []
        for k in range(base + first, base + last):
            meta = segs[2 * k + 1]
            out.append(
                (regions[meta >> 32 & _REGION_MASK], segs[2 * k], meta & _LEN_MASK)
            )
        return out

    @property
    def _nsegs(self) -> int:
        return self._batch.words[self._at + 3]

    @property
    def _nread(self) -> int:
        return self._batch.words[self._at + 4]

    # ------------------------------------------------------------ facts

    @property
    def ring_slots(self) -> int:
        """Ring slots the chain took (packed; 1 for a split chain)."""
        return self._batch.words[self._at + 1]

    @property
    def descriptor_count(self) -> int:
        """Buffer descriptors in the chain (indirect entries included, the
        descriptor pointing to an indirect table not)."""
        return self._batch.words[self._at + 7]

    @property
    def bytes_read(self) -> int:
        """Bytes consumed by :meth:`read` and friends so far."""
        return self._rpos

    @property
    def bytes_written(self) -> int:
        """Bytes written by :meth:`write` so far (the used length to report)."""
        return self._wpos

    def segments(self) -> list[ChainSegment]:
        """Every buffer piece, readable ones first.

        Returns:
            One segment per piece (a buffer spanning k regions gives k).
        """
        nread = self._nread
        return [
            ChainSegment(GuestAddress(region.gpa + offset), length, k >= nread)
            for k, (region, offset, length) in enumerate(self._pieces(0, self._nsegs))
        ]

    def readable_buffers(self) -> list[memoryview]:
        """The device-readable buffers as memoryviews of guest memory.

        Returns:
            One view per piece, in order. Do not write through them.

        With postcopy memory (regions with native copies) prefer
        :meth:`read`: touching a view holds the GIL, and a page that has not
        arrived yet would block every thread until it does.
        """
        return [r.window[o : o + n] for r, o, n in self._pieces(0, self._nread)]

    def buffers(self) -> tuple[list[memoryview], list[memoryview]]:
        """:meth:`readable_buffers` and :meth:`writable_buffers` in one call
        (one walk over the segments).

        Returns:
            The readable views and the writable views.
        """
        nread = self._nread
        pieces = self._pieces(0, self._nsegs)
        readable = [r.window[o : o + n] for r, o, n in pieces[:nread]]
        writable = [r.window[o : o + n] for r, o, n in pieces[nread:]]
        return readable, writable

    def writable_buffers(self) -> list[memoryview]:
        """The device-writable buffers as memoryviews of guest memory.

        Writes through these views are not logged; call :meth:`mark_written`
        afterwards (or use :meth:`write`). With postcopy memory prefer
        :meth:`write` (see :meth:`readable_buffers`).

        Returns:
            One view per piece, in order.
        """
        return [
            r.window[o : o + n] for r, o, n in self._pieces(self._nread, self._nsegs)
        ]

    # ------------------------------------------------------------ reading

    def readinto(self, out: Buffer) -> int:
        """Fill ``out`` from the readable part at the read cursor.

        Args:
            out: a writable buffer.

        Returns:
            Bytes copied: ``len(out)``, or fewer at the end of the readable
            part.

        Raises:
            ValueError: the memory was unmapped since the chain was popped.
        """
        dst = memoryview(out).cast("B")
        rpos = self._rpos
        want = min(dst.nbytes, self.readable_len - rpos)
        if want <= 0:
            return 0
        batch = self._batch
        table = batch._table
        if table is not None:
            ptr = batch._seg_ptr or batch._pin()
            part = dst[:want]
            words, at = batch.words, self._at
            first, nread = words[at + 2], words[at + 4]
            try:
                done = chain_copy(
                    table, ptr, batch._nsegs, first, nread, rpos, part, False
                )
            except TableReleasedError:
                done = chain_copy(
                    batch._repin(), ptr, batch._nsegs, first, nread, rpos, part, False
                )
            self._rpos = rpos + done
            return done
        done = 0
        skip = rpos
        for region, offset, length in self._pieces(0, self._nread):
            if skip >= length:
                skip -= length
                continue
            n = min(length - skip, want - done)
            region.read_into(offset + skip, dst[done : done + n])
            done += n
            skip = 0
            if done == want:
                break
        self._rpos += done
        return done

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes of the readable part (all the rest when
        negative) and advance the read cursor.

        Args:
            size: bytes wanted, or -1.

        Returns:
            The bytes; shorter at the end of the readable part.

        Raises:
            ValueError: the memory was unmapped since the chain was popped.
        """
        rpos = self._rpos
        left = self.readable_len - rpos
        n = left if size < 0 or size > left else size
        if rpos == 0 and n <= PEEK_BYTES:
            peek = self._batch._peek
            if peek is not None:
                # A request header: copied by the walk that popped the chain.
                first = self._at // 8 * PEEK_BYTES
                self._rpos = n
                return peek[first : first + n]
        out = bytearray(n)
        got = self.readinto(out)
        return bytes(out[:got])

    def read_all(self) -> bytes:
        """Read the rest of the readable part (all of it on a fresh chain).

        Returns:
            The bytes.

        Raises:
            ValueError: the memory was unmapped since the chain was popped.
        """
        return self.read(-1)

    # ------------------------------------------------------------ writing

    def write(self, data: Buffer) -> int:
        """Write ``data`` into the writable part at the write cursor, across
        buffers, marking the dirty bitmap; advance the cursor.

        Data beyond the end of the writable part is not written.

        Args:
            data: any buffer.

        Returns:
            Bytes written by this call.

        Raises:
            ValueError: the memory was unmapped since the chain was popped.
        """
        src = data if type(data) is bytes else memoryview(data).cast("B")
        start = self._wpos
        room = self.writable_len - start
        if len(src) > room:
            if room <= 0:
                return 0
            src = src[:room]
        elif not src:
            return 0
        batch = self._batch
        table = batch._table
        if table is None:
            return self._write_by_pieces(memoryview(src))
        words, at = batch.words, self._at
        nread = words[at + 4]
        first, count = words[at + 2] + nread, words[at + 3] - nread
        ptr = batch._seg_ptr or batch._pin()
        try:
            done = chain_write(table, ptr, batch._nsegs, first, count, start, src)
        except TableReleasedError:
            table = batch._repin()
            done = chain_write(table, ptr, batch._nsegs, first, count, start, src)
        self._wpos = start + done
        slot = batch._slot
        if slot is None or slot.current is not None:
            self._mark(start, done)
        return done

    def _write_by_pieces(self, view: memoryview) -> int:
        # Regions mapped on demand: piece by piece through MappedRegion.write
        # (which marks the bitmap).
        want = len(view)
        done = 0
        skip = self._wpos
        for region, offset, length in self._pieces(self._nread, self._nsegs):
            if skip >= length:
                skip -= length
                continue
            n = min(length - skip, want - done)
            region.write(offset + skip, view[done : done + n])
            done += n
            skip = 0
            if done == want:
                break
        self._wpos += done
        return done

    # ------------------------------------------------------------ files

    def write_from_file(self, fd: int, count: int, offset: int) -> int:
        """Read up to ``count`` bytes of the file ``fd`` at ``offset`` into
        the writable part at the write cursor (``preadv`` straight into guest
        memory, without the GIL); mark them in the dirty bitmap and advance
        the cursor. rust-vmm's ``Writer::write_from_at``.

        Args:
            fd: a readable file descriptor (positioned reads: a regular file
                or a block device).
            count: bytes wanted; capped at the room left.
            offset: the file position.

        Returns:
            Bytes read: fewer than asked at the end of the file or of the
            writable part.

        Raises:
            OSError: the read failed (nothing was read).
            ValueError: the memory was unmapped since the chain was popped.
        """
        start = self._wpos
        want = self.writable_len - start
        if count < want:
            want = count
        if want <= 0:
            return 0
        batch = self._batch
        table = batch._table
        if table is None:
            return self._file_by_pieces(fd, want, offset, into_chain=True)
        words, at = batch.words, self._at
        nread = words[at + 4]
        first, count = words[at + 2] + nread, words[at + 3] - nread
        done = self._file_io(fd, table, first, count, start, want, offset, True)
        self._wpos = start + done
        slot = batch._slot
        if slot is None or slot.current is not None:
            self._mark(start, done)
        return done

    def read_to_file(self, fd: int, count: int, offset: int) -> int:
        """Write up to ``count`` bytes of the readable part, from the read
        cursor, to the file ``fd`` at ``offset`` (``pwritev`` straight from
        guest memory, without the GIL); advance the cursor. rust-vmm's
        ``Reader::read_to_at``.

        Returns:
            Bytes written: fewer than asked at the end of the readable part
            (or when the file took fewer).

        Raises:
            OSError: the write failed (nothing was written).
            ValueError: the memory was unmapped since the chain was popped.
        """
        rpos = self._rpos
        want = self.readable_len - rpos
        if count < want:
            want = count
        if want <= 0:
            return 0
        batch = self._batch
        table = batch._table
        if table is None:
            return self._file_by_pieces(fd, want, offset, into_chain=False)
        words, at = batch.words, self._at
        first, count = words[at + 2], words[at + 4]
        done = self._file_io(fd, table, first, count, rpos, want, offset, False)
        self._rpos = rpos + done
        return done

    def _file_io(
        self,
        fd: int,
        table: RegionTable,
        first: int,
        count: int,
        skip: int,
        want: int,
        offset: int,
        into_chain: bool,
    ) -> int:
        # chain_file_io over segments [first, first + count) of the batch,
        # pinning the batch's own regions if its ring moved on meanwhile.
        batch = self._batch
        ptr = batch._seg_ptr or batch._pin()
        try:
            return chain_file_io(
                fd, table, ptr, batch._nsegs, first, count, skip, want, offset,
                into_chain,
            )  # fmt: skip
        except TableReleasedError:
            return chain_file_io(
                fd, batch._repin(), ptr, batch._nsegs, first, count, skip, want,
                offset, into_chain,
            )  # fmt: skip

    def _file_by_pieces(
        self, fd: int, want: int, offset: int, *, into_chain: bool
    ) -> int:
        # Regions mapped on demand: through a bounce buffer and the chain's
        # piece-by-piece copies.
        buffer = bytearray(want)
        if into_chain:
            got = os.preadv(fd, [buffer], offset)
            return self.write(memoryview(buffer)[:got])
        start = self._rpos
        got = self.readinto(buffer)
        put = os.pwritev(fd, [memoryview(buffer)[:got]], offset)
        self._rpos = start + put
        return put

    def _mark(self, start: int, length: int) -> None:
        # Mark [start, start + length) of the writable part dirty, piece by
        # piece (a bitmap without a log returns at once).
        if length <= 0:
            return
        batch = self._batch
        segs = batch.segs
        bitmaps = batch._bitmaps
        words, at = batch.words, self._at
        first = words[at + 2]
        for k in range(first + words[at + 4], first + words[at + 3]):
            meta = segs[2 * k + 1]
            n = meta & _LEN_MASK
            if start >= n:
                start -= n
                continue
            piece = min(n - start, length)
            bitmaps[meta >> 32 & _REGION_MASK].mark_dirty(segs[2 * k] + start, piece)
            length -= piece
            start = 0
            if not length:
                return

    def mark_written(self, length: int) -> None:
        """Record that the first ``length`` bytes of the writable part were
        written through :meth:`writable_buffers`: mark them in the dirty
        bitmap and move the write cursor there (if it is behind).

        Args:
            length: bytes from the start of the writable part.

        Raises:
            ValueError: ``length`` is negative or above :attr:`writable_len`.
        """
        wlen = self.writable_len
        if not 0 <= length <= wlen:
            raise ValueError(f"length {length} is not in 0..{wlen}")
        self._mark(0, length)
        if length > self._wpos:
            self._wpos = length

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.readable_len} "
            f"writable={self.writable_len} descriptors={self.descriptor_count}>"
        )
