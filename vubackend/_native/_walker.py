# RingWalker: the native state of one virtqueue (its in-flight table and the
# output arrays of its pops) and the calls that walk it: pop and push, split
# and packed, free-standing or bound to a region table.
#
# Rules of this module:
# - What the C side checks is listed in _cffi_src/native.c ("Ring walks"):
#   everything that comes from guest memory. What is checked here, before
#   each call: the region table is live; the queue size is 1..32768 (a power
#   of two for split rings); positions, addresses and flags are in range;
#   the output arrays and the in-flight table are the walker's own, sized
#   for the counts passed.
# - Calls on one walker must not race: the queue that owns it serialises
#   them (VringMutex / VringRwLock).

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Final, final

from vubackend._native import _atomics
from vubackend._native._rings import (
    _S_AVAIL_IDX,
    _S_AVAIL_WRAP,
    _S_COUNT,
    _S_DETAIL,
    _S_DRIVER,
    _S_FAULT,
    _S_MORE,
    _S_NEXT_AVAIL,
    _S_NEXT_USED,
    _S_SEGS,
    _S_USED_WRAP,
    _S_WHERE,
    _STATE_WORDS,
    _U64_LIMIT,
    CHAIN_WORDS,
    MAX_CHAIN_SEGMENTS,
    MAX_QUEUE_SIZE,
    PEEK_BYTES,
    RING_AVAIL_EVENT,
    RING_IN_ORDER,
    RING_INDIRECT,
    RING_PEEK,
    PopResult,
    PushResult,
    RegionTable,
    RingFault,
    RingStop,
    _check_u64,
    _ffi,
    _from_buffer,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cffi import FFI

__all__ = ["RingWalker"]

_lib: Final = _atomics.lib
_ARGS: Final = 6
_INFLIGHT_FREE: Final = (1 << 64) - 1
_NO_CHAINS: Final = array("I")
_NO_SEGMENTS: Final = array("Q")
_POP_FLAGS: Final = RING_INDIRECT | RING_AVAIL_EVENT | RING_IN_ORDER
_new_tuple: Final = tuple.__new__
# Enum members by value: a tuple index is much cheaper than RingStop(n).
_STOPS: Final = tuple(RingStop)
_FAULTS: Final = tuple(RingFault)
_split_pop: Final = _lib.vu_split_pop
_split_push: Final = _lib.vu_split_push
_packed_pop: Final = _lib.vu_packed_pop
_packed_push: Final = _lib.vu_packed_push
_ring_pop: Final = _lib.vu_ring_pop
_ring_push: Final = _lib.vu_ring_push
_ring_push1: Final = _lib.vu_ring_push1
_ring_complete: Final = _lib.vu_ring_complete
_ring_complete1: Final = _lib.vu_ring_complete1
_ring_complete_records: Final = _lib.vu_ring_complete_records


@final
class RingWalker:
    """The native state of one virtqueue: its in-flight table and the output
    arrays of its batch pops.

    The in-flight table has one u64 per id (split head, packed buffer id):
    ``2**64 - 1`` when free, else the chain's writable length (bits 0-31) and
    ring slots (bits 32-47). Pops fill it and pushes check and clear it, so a
    used entry for an id that is not in flight, or a length above what the
    chain can hold, is refused. The pure-Python ring code uses the same table
    through :attr:`inflight`, so the two paths can be mixed on one queue.

    Not thread-safe: the queue that owns it serialises calls.
    """

    __slots__ = (
        "_bound",
        "_chain_words",
        "_chains",
        "_entries",
        "_inflight_buf",
        "_inflight_ptr",
        "_max_chains",
        "_max_segs",
        "_packed",
        "_peek",
        "_peek_bytes",
        "_qsize",
        "_ring",
        "_scratch",
        "_seg_words",
        "_segs",
        "_state",
        "_state_words",
        "_track_pin",
        "inflight",
    )

    FREE: Final = _INFLIGHT_FREE
    """The in-flight table's value for a free id."""

    def __init__(self, qsize: int, *, packed: bool, max_chains: int = 256) -> None:
        """Allocate the state of a queue of ``qsize`` entries.

        Args:
            qsize: the queue size, 1..32768; a power of two unless ``packed``.
            packed: whether the queue is a packed ring.
            max_chains: most chains one pop call returns (1..32768).

        Raises:
            ValueError: a value is out of range.
        """
        if not 1 <= qsize <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {qsize} is not in 1..{MAX_QUEUE_SIZE}")
        if not packed and qsize & (qsize - 1):
            raise ValueError(f"split queue size {qsize} is not a power of two")
        if not 1 <= max_chains <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_chains {max_chains} is not in 1..{MAX_QUEUE_SIZE}")
        self._qsize = qsize
        self._packed = packed
        self._max_chains = max_chains
        self._max_segs = 4 * max_chains + MAX_CHAIN_SEGMENTS
        self._inflight_buf = bytearray(b"\xff" * (8 * qsize))
        self.inflight: memoryview = memoryview(self._inflight_buf).cast("Q")
        """The in-flight table, one u64 per id (see the class docstring)."""
        self._inflight_ptr = _from_buffer("uint64_t[]", self._inflight_buf)
        # The walks' outputs are arrays pinned for C (an exported array
        # cannot be resized): a pop's result is then copied out with one
        # slice each.
        self._chain_words = array("I", bytes(4 * CHAIN_WORDS * max_chains))
        self._chains = _from_buffer("uint32_t[]", self._chain_words)
        self._seg_words = array("Q", bytes(16 * self._max_segs))
        self._segs = _from_buffer("uint64_t[]", self._seg_words)
        self._state = _ffi.new("uint64_t[]", _STATE_WORDS)
        # Reading the results through a memoryview is several times cheaper
        # than indexing the cffi array (one call per index).
        self._state_words = memoryview(_ffi.buffer(self._state)).cast("Q")
        self._entries = _ffi.new("uint32_t[]", 2)
        self._scratch = _ffi.new("uint32_t[]", 2 * max_chains)
        self._peek = _ffi.new("uint8_t[]", max_chains * PEEK_BYTES)
        self._peek_bytes = memoryview(_ffi.buffer(self._peek))
        # The bound calls' arguments (bind()), in the C struct.
        self._ring = _ffi.new("vu_ring *")
        # The struct itself (cdata indexing is untyped: its fields are set
        # by name, as cffi allows).
        ring = self._ring[0]
        ring.inflight = self._inflight_ptr
        ring.chains = self._chains
        ring.segs = self._segs
        ring.state = self._state
        ring.peek = self._peek
        ring.scratch = self._scratch
        ring.qsize = qsize
        ring.max_chains = max_chains
        ring.max_segs = self._max_segs
        ring.peek_len = PEEK_BYTES
        ring.packed = 1 if packed else 0
        self._bound: RegionTable | None = None
        self._track_pin: FFI.CData | None = None  # _track.py

    @property
    def qsize(self) -> int:
        """The queue size."""
        return self._qsize

    @property
    def packed(self) -> bool:
        """Whether this walker serves a packed ring."""
        return self._packed

    @property
    def max_chains(self) -> int:
        """Most chains one pop call returns."""
        return self._max_chains

    def clear_inflight(self) -> None:
        """Mark every id free (a ring reset or a new base)."""
        self._inflight_buf[:] = b"\xff" * len(self._inflight_buf)

    # ------------------------------------------------------------ bound calls
    #
    # The data path's calls: bind() checks the table and the ring addresses
    # once, then pop_bound/push_bound/push_one check only what changes per
    # call (positions, flags, counts), and return plain tuples.

    def bind(
        self, table: RegionTable, desc_gpa: int, avail_gpa: int = 0, used_gpa: int = 0
    ) -> None:
        """Bind the walker to a region table and the ring's addresses (split:
        descriptor table, available and used rings; packed: the descriptor
        ring) for :meth:`pop_bound`, :meth:`push_bound` and :meth:`push_one`.
        The walker keeps ``table`` until the next bind or :meth:`unbind`.

        Raises:
            ValueError: the table was released, or an address is not a u64.
        """
        table._check()
        _check_u64(desc_gpa, "descriptor table address")
        _check_u64(avail_gpa, "available ring address")
        _check_u64(used_gpa, "used ring address")
        ring = self._ring[0]
        ring.regions = table._table
        ring.nregions = table._count
        ring.desc_gpa = desc_gpa
        ring.avail_gpa = avail_gpa
        ring.used_gpa = used_gpa
        self._bound = table

    def unbind(self) -> None:
        """Forget the bound table (the bound calls refuse until the next bind)."""
        self._bound = None
        ring = self._ring[0]
        ring.regions = _ffi.NULL
        ring.nregions = 0

    def pop_bound(
        self, next_avail: int, avail_wrap: int, flags: int, max_chains: int
    ) -> tuple[RingStop, int, int, int]:
        """:meth:`split_pop` or :meth:`packed_pop` on the bound ring. The C
        side checks the position, the flags and ``max_chains`` itself.

        Returns:
            ``(stop, chains popped, next_avail, avail_wrap)``; the rest of
            the result (faults) with :meth:`last_pop`. :meth:`pop_take`
            also returns the chains.

        Raises:
            ValueError: not bound, the table was released, or an argument is
                out of range.
        """
        stop = self._pop(next_avail, avail_wrap, flags, max_chains)
        st = self._state_words
        return (_STOPS[stop], st[_S_COUNT], st[_S_NEXT_AVAIL], st[_S_AVAIL_WRAP])

    def pop_take(
        self, next_avail: int, avail_wrap: int, flags: int, max_chains: int
    ) -> tuple[
        RingStop,
        int,
        int,
        int,
        tuple[array[int], array[int], bytes | None, FFI.CData] | None,
    ]:
        """:meth:`pop_bound` and what came, in one call: ``(stop, count,
        next_avail, avail_wrap, taken)``; ``taken`` is None when nothing
        came, else copies of the chains' record words and segment words, the
        headers (``bytes``, only with ``RING_PEEK``), and the segment words
        pinned for ``chain_copy`` / ``chain_file_io``. The data path's pop."""
        stop = self._pop(next_avail, avail_wrap, flags, max_chains)
        st = self._state_words
        count = st[_S_COUNT]
        if not count:
            return (_STOPS[stop], 0, st[_S_NEXT_AVAIL], st[_S_AVAIL_WRAP], None)
        chains = self._chain_words[: CHAIN_WORDS * count]
        segments = self._seg_words[: 2 * st[_S_SEGS]]
        taken = (
            chains,
            segments,
            self._peek_bytes[: count * PEEK_BYTES].tobytes()
            if flags & RING_PEEK
            else None,
            _from_buffer("uint64_t[]", segments),
        )
        return (_STOPS[stop], count, st[_S_NEXT_AVAIL], st[_S_AVAIL_WRAP], taken)

    def _live(self) -> None:
        table = self._bound
        if table is None or table._count < 0:
            raise ValueError("the walker is not bound to a live region table")

    def _pop(
        self, next_avail: int, avail_wrap: int, flags: int, max_chains: int
    ) -> int:
        # The bound pop, from a position: its raw stop code.
        self._live()
        st = self._state_words
        st[_S_NEXT_AVAIL] = next_avail
        st[_S_AVAIL_WRAP] = avail_wrap
        stop: int = _ring_pop(self._ring, flags, max_chains)
        if stop == _ARGS:
            raise ValueError(
                f"pop at {next_avail} (wrap {avail_wrap}), flags {flags:#x}, "
                f"max_chains {max_chains}: out of range"
            )
        return stop

    def last_pop(self, stop: RingStop) -> PopResult:
        """The full result of the last bound pop (which returned ``stop``)."""
        return self._pop_result(stop)

    def push_bound(
        self, next_used: int, used_wrap: int, flags: int, entries: Sequence[int]
    ) -> tuple[RingStop, int, int]:
        """:meth:`split_push` or :meth:`packed_push` on the bound ring. The C
        side checks the position and the flags itself.

        Returns:
            ``(stop, next_used, used_wrap)``; a fault's details with
            :meth:`last_push`.

        Raises:
            ValueError: not bound, the table was released, or an argument is
                out of range.
        """
        self._live()
        ptr, count, keep = self._entries_for(entries)
        st = self._state_words
        st[_S_NEXT_USED] = next_used
        st[_S_USED_WRAP] = used_wrap
        stop = _ring_push(self._ring, flags, ptr, count)
        del keep
        if stop == _ARGS:
            raise ValueError(
                f"push at {next_used} (wrap {used_wrap}), flags {flags:#x}: "
                f"out of range"
            )
        return (_STOPS[stop], st[_S_NEXT_USED], st[_S_USED_WRAP])

    def push_one(
        self, next_used: int, used_wrap: int, flags: int, ident: int, length: int
    ) -> tuple[RingStop, int, int]:
        """:meth:`push_bound` of one ``(ident, length)`` entry."""
        self._live()
        st = self._state_words
        st[_S_NEXT_USED] = next_used
        st[_S_USED_WRAP] = used_wrap
        try:
            stop = _ring_push1(self._ring, flags, ident, length)
        except OverflowError as exc:
            raise ValueError(f"used entry ({ident}, {length}) is not two u32s") from exc
        if stop == _ARGS:
            raise ValueError(
                f"push at {next_used} (wrap {used_wrap}), flags {flags:#x}: "
                f"out of range"
            )
        return (_STOPS[stop], st[_S_NEXT_USED], st[_S_USED_WRAP])

    def complete(
        self, next_used: int, used_wrap: int, flags: int, entries: Sequence[int]
    ) -> tuple[RingStop, int, int, int, bool]:
        """:meth:`push_bound`, then one full fence, then read the driver's
        notification word and whether more chains are available (§5.4 rules
        5 and 6 in one fence).

        Args:
            next_used: the used position to write at.
            used_wrap: its wrap counter (packed; 0 for split).
            flags: ``RING_IN_ORDER`` (packed) and/or ``RING_EVENT_IDX``
                (split: read ``used_event`` too).
            entries: ``(id, len)`` pairs, flattened.

        Returns:
            ``(stop, next_used, used_wrap, driver, more)``: ``driver`` is, for
            a split ring, ``avail.flags | used_event << 16``; for a packed
            ring, the driver event suppression area (``off_wrap | flags <<
            16``); ``more`` whether a chain is available at the next
            position. A fault's details with :meth:`last_push`.

        Raises:
            ValueError: not bound, the table was released, or an argument is
                out of range.
        """
        self._live()
        st = self._state_words
        st[_S_NEXT_USED] = next_used
        st[_S_USED_WRAP] = used_wrap
        if len(entries) == 2:
            # One entry (a request at a time): no array to build.
            try:
                stop = _ring_complete1(self._ring, flags, entries[0], entries[1])
            except OverflowError as exc:
                raise ValueError(
                    f"used entry {tuple(entries)} is not two u32s"
                ) from exc
        else:
            ptr, count, keep = self._entries_for(entries)
            stop = _ring_complete(self._ring, flags, ptr, count)
            del keep
        if stop == _ARGS:
            raise ValueError(
                f"completion at {next_used} (wrap {used_wrap}), flags {flags:#x}: "
                f"out of range"
            )
        return (
            _STOPS[stop],
            st[_S_NEXT_USED],
            st[_S_USED_WRAP],
            st[_S_DRIVER],
            st[_S_MORE] != 0,
        )

    def complete_records(
        self,
        next_used: int,
        used_wrap: int,
        flags: int,
        records: FFI.CData,
        count: int,
        length: int | array[int],
        first: int = 0,
    ) -> tuple[RingStop, int, int, int, bool]:
        """:meth:`complete` of chains ``[first, first + count)`` of a pop's
        records (pinned with ``pin_records``), every one with used length
        ``length``, or ``length[k]`` when it is an ``array('I')``: a batch
        returned without an int per chain.

        Raises:
            ValueError: not bound, the table was released, the chains are
                not in ``records``, ``length`` is shorter than ``count``,
                more than one pop's worth, or an argument is out of range.
        """
        self._live()
        if first < 0 or count < 0 or (first + count) * CHAIN_WORDS > len(records):
            raise ValueError(
                f"chains {first}..{first + count} are not in {len(records)} "
                f"record words"
            )
        ptr = _ffi.NULL
        if not isinstance(length, int):
            if len(length) < count or length.typecode != "I":
                raise ValueError(f"{count} chains need an array('I') of lengths")
            ptr = _from_buffer("uint32_t[]", length)
            length = 0
        st = self._state_words
        st[_S_NEXT_USED] = next_used
        st[_S_USED_WRAP] = used_wrap
        try:
            stop = _ring_complete_records(
                self._ring, flags, records + first * CHAIN_WORDS, count, length, ptr
            )
        except OverflowError as exc:
            raise ValueError(f"count {count} or length {length} is not a u32") from exc
        if stop == _ARGS:
            raise ValueError(
                f"completion of {count} records at {next_used} (wrap {used_wrap}), "
                f"flags {flags:#x}: out of range"
            )
        return (
            _STOPS[stop],
            st[_S_NEXT_USED],
            st[_S_USED_WRAP],
            st[_S_DRIVER],
            st[_S_MORE] != 0,
        )

    def last_push(self, stop: RingStop) -> PushResult:
        """The full result of the last bound push (which returned ``stop``)."""
        return self._push_result(stop)

    # ------------------------------------------------------------ pops

    def _pop_args(self, table: RegionTable, max_chains: int, flags: int) -> int:
        if not 0 <= flags <= _POP_FLAGS:
            raise ValueError(f"ring flags {flags:#x} are unknown")
        if max_chains < 1:
            raise ValueError(f"max_chains {max_chains} is below 1")
        table._check()
        return min(max_chains, self._max_chains)

    def _pop_result(self, stop: int) -> PopResult:
        st = self._state_words
        count = st[_S_COUNT]
        if count:
            # Copies as arrays: one memcpy each, instead of an int object per
            # word (tolist), which cost more than the C walk itself.
            chains = self._chain_words[: count * CHAIN_WORDS]
            segments = self._seg_words[: 2 * st[_S_SEGS]]
        else:
            # Shared and empty: an empty pop (every drain ends with one)
            # allocates nothing. Nobody appends to a result.
            chains = _NO_CHAINS
            segments = _NO_SEGMENTS
        # tuple.__new__: the NamedTuple's own __new__ is a Python function,
        # and this runs once per pop.
        return _new_tuple(
            PopResult,
            (
                _STOPS[stop],
                chains,
                segments,
                st[_S_NEXT_AVAIL],
                st[_S_AVAIL_WRAP],
                st[_S_AVAIL_IDX],
                _FAULTS[st[_S_FAULT]],
                st[_S_DETAIL],
                st[_S_WHERE],
            ),
        )

    def split_pop(
        self,
        table: RegionTable,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        next_avail: int,
        *,
        flags: int,
        max_chains: int,
    ) -> PopResult:
        """Pop up to ``max_chains`` chains from a split ring.

        Args:
            table: the memory regions (live).
            desc_gpa: guest address of the descriptor table.
            avail_gpa: guest address of the available ring.
            used_gpa: guest address of the used ring (``avail_event`` lives
                at its end).
            next_avail: the index of the next chain to pop (u16).
            flags: ``RING_INDIRECT`` and/or ``RING_AVAIL_EVENT``.
            max_chains: most chains to pop (capped at the walker's limit).

        Returns:
            What happened; the chains and segments are copies.

        Raises:
            ValueError: the walker serves a packed ring, the table was
                released, or an argument is out of range.
        """
        # Every check in one expression on the way in (this runs once per
        # batch, often per request); the slow path says what was wrong.
        if (
            self._packed
            or table._count < 0
            or not 0 <= flags <= _POP_FLAGS
            or max_chains < 1
            or not 0 <= next_avail <= 0xFFFF
            or not 0 <= desc_gpa < _U64_LIMIT
            or not 0 <= avail_gpa < _U64_LIMIT
            or not 0 <= used_gpa < _U64_LIMIT
        ):
            if self._packed:
                raise ValueError("split_pop on a packed walker")
            self._pop_args(table, max_chains, flags)
            _check_u64(desc_gpa, "descriptor table address")
            _check_u64(avail_gpa, "available ring address")
            _check_u64(used_gpa, "used ring address")
            raise ValueError(f"next_avail {next_avail} is not a u16")
        count = max_chains if max_chains < self._max_chains else self._max_chains
        self._state_words[_S_NEXT_AVAIL] = next_avail
        stop = _split_pop(
            table._table,
            table._count,
            desc_gpa,
            avail_gpa,
            used_gpa,
            self._qsize,
            flags,
            self._inflight_ptr,
            self._chains,
            count,
            self._segs,
            self._max_segs,
            self._state,
        )
        return self._pop_result(stop)

    def packed_pop(
        self,
        table: RegionTable,
        desc_gpa: int,
        next_avail: int,
        avail_wrap: int,
        *,
        flags: int,
        max_chains: int,
    ) -> PopResult:
        """Pop up to ``max_chains`` chains from a packed ring.

        Args:
            table: the memory regions (live).
            desc_gpa: guest address of the descriptor ring.
            next_avail: the slot of the next chain to pop (< queue size).
            avail_wrap: the device's available wrap counter (0 or 1).
            flags: ``RING_INDIRECT`` or 0.
            max_chains: most chains to pop (capped at the walker's limit).

        Returns:
            What happened; the chains and segments are copies.

        Raises:
            ValueError: the walker serves a split ring, the table was
                released, or an argument is out of range.
        """
        if not self._packed:
            raise ValueError("packed_pop on a split walker")
        count = self._pop_args(table, max_chains, flags)
        _check_u64(desc_gpa, "descriptor ring address")
        if not 0 <= next_avail < self._qsize:
            raise ValueError(f"next_avail {next_avail} is not below {self._qsize}")
        if avail_wrap not in (0, 1):
            raise ValueError(f"wrap counter {avail_wrap} is not 0 or 1")
        st = self._state
        st[_S_NEXT_AVAIL] = next_avail
        st[_S_AVAIL_WRAP] = avail_wrap
        stop = _packed_pop(
            table._table,
            table._count,
            desc_gpa,
            self._qsize,
            flags,
            self._inflight_ptr,
            self._chains,
            count,
            self._segs,
            self._max_segs,
            st,
        )
        return self._pop_result(stop)

    # ------------------------------------------------------------ pushes

    def _entries_for(self, entries: Sequence[int]) -> tuple[FFI.CData, int, object]:
        # (pointer, count, keep-alive) for a flat (id, len, id, len, ...) list.
        if len(entries) == 2:
            buf = self._entries
            ident, length = entries
            if not (0 <= ident <= 0xFFFF_FFFF and 0 <= length <= 0xFFFF_FFFF):
                raise ValueError(f"used entry ({ident}, {length}) is not two u32s")
            buf[0] = ident
            buf[1] = length
            return buf, 1, None
        if len(entries) % 2:
            raise ValueError("used entries must be (id, len) pairs")
        try:
            words = array("I", entries)
        except OverflowError as exc:
            raise ValueError(f"used entries must be u32s: {exc}") from exc
        if words.itemsize != 4:  # pragma: no cover - every Linux ABI has 4
            raise ValueError("array('I') is not 32-bit on this platform")
        if not words:
            return self._entries, 0, None
        return _from_buffer("uint32_t[]", words), len(words) // 2, words

    def _push_result(self, stop: int) -> PushResult:
        st = self._state_words
        return _new_tuple(
            PushResult,
            (
                _STOPS[stop],
                st[_S_COUNT],
                st[_S_NEXT_USED],
                st[_S_USED_WRAP],
                _FAULTS[st[_S_FAULT]],
                st[_S_DETAIL],
                st[_S_WHERE],
            ),
        )

    def split_push(
        self, table: RegionTable, used_gpa: int, next_used: int, entries: Sequence[int]
    ) -> PushResult:
        """Write used elements into a split ring and publish ``used.idx``.

        All entries are checked (id in range and in flight, length at most
        the chain's writable bytes, no id twice) before anything is written;
        one bad entry writes nothing.

        Args:
            table: the memory regions (live).
            used_gpa: guest address of the used ring.
            next_used: the used index to write at (u16).
            entries: ``(id, len)`` pairs, flattened.

        Returns:
            What happened.

        Raises:
            ValueError: the walker serves a packed ring, the table was
                released, or an argument is out of range.
        """
        if (
            self._packed
            or table._count < 0
            or not 0 <= used_gpa < _U64_LIMIT
            or not 0 <= next_used <= 0xFFFF
        ):
            if self._packed:
                raise ValueError("split_push on a packed walker")
            table._check()
            _check_u64(used_gpa, "used ring address")
            raise ValueError(f"next_used {next_used} is not a u16")
        ptr, count, keep = self._entries_for(entries)
        st = self._state
        st[_S_NEXT_USED] = next_used
        stop = _split_push(
            table._table,
            table._count,
            used_gpa,
            self._qsize,
            0,
            self._inflight_ptr,
            ptr,
            count,
            st,
        )
        del keep
        return self._push_result(stop)

    def packed_push(
        self,
        table: RegionTable,
        desc_gpa: int,
        next_used: int,
        used_wrap: int,
        entries: Sequence[int],
        *,
        flags: int,
    ) -> PushResult:
        """Write used descriptors into a packed ring: ids and lengths, a
        release fence, then the flags, the first descriptor's last.

        All entries are checked before anything is written, as in
        :meth:`split_push`.

        Args:
            table: the memory regions (live).
            desc_gpa: guest address of the descriptor ring.
            next_used: the slot to write at (< queue size).
            used_wrap: the device's used wrap counter (0 or 1).
            entries: ``(id, len)`` pairs, flattened.
            flags: ``RING_IN_ORDER`` or 0.

        Returns:
            What happened.

        Raises:
            ValueError: the walker serves a split ring, the table was
                released, or an argument is out of range.
        """
        if not self._packed:
            raise ValueError("packed_push on a split walker")
        table._check()
        _check_u64(desc_gpa, "descriptor ring address")
        if not 0 <= next_used < self._qsize:
            raise ValueError(f"next_used {next_used} is not below {self._qsize}")
        if used_wrap not in (0, 1):
            raise ValueError(f"wrap counter {used_wrap} is not 0 or 1")
        if flags not in (0, RING_IN_ORDER):
            raise ValueError(f"packed push flags {flags:#x} are unknown")
        ptr, count, keep = self._entries_for(entries)
        st = self._state
        st[_S_NEXT_USED] = next_used
        st[_S_USED_WRAP] = used_wrap
        stop = _packed_push(
            table._table,
            table._count,
            desc_gpa,
            self._qsize,
            flags,
            self._inflight_ptr,
            ptr,
            count,
            st,
        )
        del keep
        return self._push_result(stop)

    def __repr__(self) -> str:
        kind = "packed" if self._packed else "split"
        return f"<RingWalker {kind} size={self._qsize}>"
