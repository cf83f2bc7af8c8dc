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
# - Writes go through MappedRegion.write, which marks the region's dirty
#   bitmap after copying (vhost-user-protocol.md §4.7, §5.4 rule 7).
#   Memoryviews from writable_buffers() are raw: whoever writes through them
#   marks the bitmap (mark_written does it for a byte count).
# - Chains popped together share one ChainBatch: the flat record words and
#   segment words of the C layout (native.c: 8 u32 per chain, 2 ints per
#   segment), whichever path produced them. A chain is a batch and an index,
#   so that popping costs one small object per chain and no per-descriptor
#   Python work; the fields are read out of the batch when asked for.
# - A chain refers to the memory snapshot it was popped from. Used after that
#   snapshot was unmapped, its reads and writes fail with ValueError from the
#   released views; they never touch freed memory.

from __future__ import annotations

from collections.abc import MutableSequence
from itertools import repeat
from typing import TYPE_CHECKING, Final, NamedTuple, final

from vubackend.memory import GuestAddress, MappedRegion

if TYPE_CHECKING:
    from typing_extensions import Buffer

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

    __slots__ = ("regions", "segs", "words")

    def __init__(
        self,
        words: MutableSequence[int],
        segs: MutableSequence[int],
        regions: tuple[MappedRegion, ...],
    ) -> None:
        # Lists from the Python walks, arrays (u32 / u64) from the C walks.
        self.words = words
        self.segs = segs
        self.regions = regions

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

    @classmethod
    def of(cls, chain: DescriptorChain) -> ChainBatch:
        """A batch of one chain (a copy of its record and segments)."""
        batch, at = chain._batch, chain._at
        record = batch.words[at : at + 8]
        base, nsegs = record[2], record[3]
        record[2] = 0
        return cls(record, batch.segs[2 * base : 2 * (base + nsegs)], batch.regions)

    @staticmethod
    def flatten(batches: list[ChainBatch]) -> list[DescriptorChain]:
        """The chains of several batches, in order."""
        if len(batches) == 1:
            return batches[0].chains()
        return [chain for batch in batches for chain in batch.chains()]

    def chains(self) -> list[DescriptorChain]:
        """One chain per record, in order."""
        return list(
            map(
                DescriptorChain,
                repeat(self, len(self.words) // 8),
                range(0, len(self.words), 8),
            )
        )


@final
class DescriptorChain:
    """A descriptor chain popped from a virtqueue.

    Made by the queues (``pop_chains``), not by users. Hand it back with
    ``add_used(chain.head, chain.bytes_written)``.

    The readable part (what the driver sent) is read with :meth:`read`,
    :meth:`readinto` and :meth:`read_all`, which advance a read cursor; the
    writable part is filled with :meth:`write`, which advances a write
    cursor. :meth:`readable_buffers` and :meth:`writable_buffers` give the
    raw memoryviews (they may span several regions, one view per piece).
    """

    __slots__ = ("_at", "_batch", "_rpos", "_wpos")

    def __init__(self, batch: ChainBatch, at: int) -> None:
        # Private: the queues build chains from checked walks.
        self._batch = batch
        self._at = at
        self._rpos = 0
        self._wpos = 0

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
    def head(self) -> int:
        """The id to hand back in ``add_used``: the head descriptor's index
        (split ring) or the buffer id (packed ring)."""
        return self._batch.words[self._at]

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
    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers."""
        return self._batch.words[self._at + 5]

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers."""
        return self._batch.words[self._at + 6]

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
        want = min(dst.nbytes, self.readable_len - self._rpos)
        if want <= 0:
            return 0
        done = 0
        skip = self._rpos
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
        left = self.readable_len - self._rpos
        n = left if size < 0 else min(size, left)
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
        src = data if isinstance(data, bytes) else memoryview(data).cast("B")
        want = min(len(src), self.writable_len - self._wpos)
        if want <= 0:
            return 0
        view = memoryview(src)
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
        left = length
        for region, offset, n in self._pieces(self._nread, self._nsegs):
            if left == 0:
                break
            n = min(n, left)
            region.bitmap.mark_dirty(offset, n)
            left -= n
        self._wpos = max(self._wpos, length)

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.readable_len} "
            f"writable={self.writable_len} descriptors={self.descriptor_count}>"
        )
