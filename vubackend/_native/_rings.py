# What the ring walks of the native helper share: the numbers shared with C
# (record and state words, ring flags, stop and fault codes), RegionTable
# (the guest memory regions, pinned, in the C layout) and the results of a
# walk (PopResult, PushResult). The walker itself is in _walker.py.
#
# Rules of this module:
# - Imported by vubackend._native after the helper passed its ABI checks;
#   uses the compiled module directly (from vubackend._native import
#   _atomics), like the package facade.
# - The numbers shared with C are checked against the compiled module at
#   import; a mismatch is a NativeHelperError.
# - A table is live, sorted, non-overlapping and below 2**64 (checked when
#   it is built); release() must not race with a walk that uses it (the
#   queue that owns both serialises them).

from __future__ import annotations

import enum
from array import array
from typing import TYPE_CHECKING, Final, NamedTuple, final

from vubackend._native import _atomics
from vubackend.errors import NativeHelperError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cffi import FFI
    from typing_extensions import Buffer

__all__ = [
    "CHAIN_WORDS",
    "MAX_CHAIN_SEGMENTS",
    "MAX_INDIRECT",
    "MAX_QUEUE_SIZE",
    "PEEK_BYTES",
    "RING_AVAIL_EVENT",
    "RING_EVENT_IDX",
    "RING_INDIRECT",
    "RING_IN_ORDER",
    "PopResult",
    "PushResult",
    "RegionTable",
    "RingFault",
    "RingStop",
    "TableReleasedError",
]

_REMEDY: Final = "reinstall vubackend with `pip install .` (or `pip install -e .`)"
_ffi: Final = _atomics.ffi
_lib: Final = _atomics.lib
_from_buffer: Final = _ffi.from_buffer
_unpin: Final = _ffi.release


def _pin(buffer: Buffer, what: str) -> FFI.CData:
    """Pin a writable, C-contiguous buffer as ``uint8_t[]`` with a clear error."""
    try:
        return _from_buffer("uint8_t[]", buffer, require_writable=True)
    except (BufferError, TypeError) as exc:
        raise TypeError(
            f"{what} must be a writable C-contiguous buffer, got "
            f"{type(buffer).__name__}: {exc}"
        ) from exc


CHAIN_WORDS: Final = 8
"""u32 words per chain record of :attr:`PopResult.chains`: ``id`` (split
head or packed buffer id), ``slots`` (ring slots the chain took; 1 for split),
``first_seg``, ``nsegs``, ``nread_segs`` (readable segments come first),
``readable_len``, ``writable_len``, ``descriptors`` (buffer descriptors)."""
MAX_QUEUE_SIZE: Final = 32768
MAX_INDIRECT: Final = 32768
MAX_CHAIN_SEGMENTS: Final = 4096
PEEK_BYTES: Final = 16
"""Bytes of each chain's readable part that a bound pop copies out with the
chain (:meth:`RingWalker.take`): the request header of most devices."""
_STATE_WORDS: Final = 16

RING_INDIRECT: Final = 1
"""Ring flag: indirect descriptors were negotiated."""
RING_AVAIL_EVENT: Final = 2
"""Ring flag (split pops): write ``avail_event`` as the device consumes, with
the full fence and re-check of §5.4 rule 6 when the ring runs empty."""
RING_IN_ORDER: Final = 4
"""Ring flag (packed pushes): fold used entries of length 0 into the next one
(VIRTIO_F_IN_ORDER, one used descriptor per run)."""
RING_EVENT_IDX: Final = 8
"""Ring flag (split completions): EVENT_IDX was negotiated, read
``used_event`` too."""
RING_PEEK: Final = 16
"""Ring flag (bound pops): copy each chain's request header out with it
(:data:`PEEK_BYTES`; :meth:`RingWalker.pop_take`)."""

# Words of the state array.
_S_NEXT_AVAIL: Final = 0
_S_AVAIL_WRAP: Final = 1
_S_NEXT_USED: Final = 2
_S_USED_WRAP: Final = 3
_S_COUNT: Final = 4
_S_SEGS: Final = 5
_S_FAULT: Final = 6
_S_DETAIL: Final = 7
_S_WHERE: Final = 8
_S_AVAIL_IDX: Final = 9
_S_DRIVER: Final = 10
_S_MORE: Final = 11

_U64_LIMIT: Final = 1 << 64
# Segment words carry the region index in bits 32..62.
_MAX_REGIONS: Final = 0x7FFF_FFFF


class RingStop(enum.IntEnum):
    """Why a native pop stopped (the C ``VU_STOP_*`` values)."""

    EMPTY = 0
    """The ring has no more available chains (pushes: success)."""
    LIMIT = 1
    """``max_chains`` chains were popped."""
    FULL = 2
    """The next chain did not fit in the segment array; call again."""
    FAULT = 3
    """The next chain (or a used entry) is malformed; it was not consumed."""
    BROKEN = 4
    """Split: ``avail.idx`` moved more than the queue size ahead."""
    RING = 5
    """A ring part is not inside one memory region, or not aligned in host
    memory; ``detail`` is its guest address."""
    ARGS = 6
    """A bound call's position or flags were out of range, or the walker is
    not bound (a caller bug; the bound calls raise ValueError for it)."""


class RingFault(enum.IntEnum):
    """What was wrong with a chain or a used entry (the C ``VU_FAULT_*``)."""

    NONE = 0
    HEAD_RANGE = 1
    NEXT_RANGE = 2
    LOOP = 3
    INDIRECT_NOT_NEGOTIATED = 4
    INDIRECT_WITH_NEXT = 5
    INDIRECT_NESTED = 6
    INDIRECT_LEN = 7
    INDIRECT_UNMAPPED = 8
    BUFFER_UNMAPPED = 9
    TOTAL_OVERFLOW = 10
    WRITABLE_ORDER = 11
    TOO_MANY_SEGMENTS = 12
    ID_RANGE = 13
    IN_FLIGHT = 14
    NOT_IN_FLIGHT = 15
    USED_LEN = 16


def _check_ring_constants() -> None:
    # The numbers above must be the C ones: a mismatch would make Python
    # misread every result. Checked once, at import.
    pairs = [
        ("VU_CHAIN_WORDS", CHAIN_WORDS, _lib.VU_CHAIN_WORDS),
        ("VU_STATE_WORDS", _STATE_WORDS, _lib.VU_STATE_WORDS),
        ("VU_MAX_QUEUE_SIZE", MAX_QUEUE_SIZE, _lib.VU_MAX_QUEUE_SIZE),
        ("VU_MAX_INDIRECT", MAX_INDIRECT, _lib.VU_MAX_INDIRECT),
        ("VU_MAX_CHAIN_SEGMENTS", MAX_CHAIN_SEGMENTS, _lib.VU_MAX_CHAIN_SEGMENTS),
        ("VU_RING_INDIRECT", RING_INDIRECT, _lib.VU_RING_INDIRECT),
        ("VU_RING_AVAIL_EVENT", RING_AVAIL_EVENT, _lib.VU_RING_AVAIL_EVENT),
        ("VU_RING_IN_ORDER", RING_IN_ORDER, _lib.VU_RING_IN_ORDER),
        ("VU_RING_EVENT_IDX", RING_EVENT_IDX, _lib.VU_RING_EVENT_IDX),
        ("VU_RING_PEEK", RING_PEEK, _lib.VU_RING_PEEK),
        ("VU_S_NEXT_AVAIL", _S_NEXT_AVAIL, _lib.VU_S_NEXT_AVAIL),
        ("VU_S_AVAIL_WRAP", _S_AVAIL_WRAP, _lib.VU_S_AVAIL_WRAP),
        ("VU_S_NEXT_USED", _S_NEXT_USED, _lib.VU_S_NEXT_USED),
        ("VU_S_USED_WRAP", _S_USED_WRAP, _lib.VU_S_USED_WRAP),
        ("VU_S_COUNT", _S_COUNT, _lib.VU_S_COUNT),
        ("VU_S_SEGS", _S_SEGS, _lib.VU_S_SEGS),
        ("VU_S_FAULT", _S_FAULT, _lib.VU_S_FAULT),
        ("VU_S_DETAIL", _S_DETAIL, _lib.VU_S_DETAIL),
        ("VU_S_WHERE", _S_WHERE, _lib.VU_S_WHERE),
        ("VU_S_AVAIL_IDX", _S_AVAIL_IDX, _lib.VU_S_AVAIL_IDX),
        ("VU_S_DRIVER", _S_DRIVER, _lib.VU_S_DRIVER),
        ("VU_S_MORE", _S_MORE, _lib.VU_S_MORE),
        ("VU_STOP_EMPTY", RingStop.EMPTY, _lib.VU_STOP_EMPTY),
        ("VU_STOP_LIMIT", RingStop.LIMIT, _lib.VU_STOP_LIMIT),
        ("VU_STOP_FULL", RingStop.FULL, _lib.VU_STOP_FULL),
        ("VU_STOP_FAULT", RingStop.FAULT, _lib.VU_STOP_FAULT),
        ("VU_STOP_BROKEN", RingStop.BROKEN, _lib.VU_STOP_BROKEN),
        ("VU_STOP_RING", RingStop.RING, _lib.VU_STOP_RING),
        ("VU_STOP_ARGS", RingStop.ARGS, _lib.VU_STOP_ARGS),
        ("VU_FAULT_NONE", RingFault.NONE, _lib.VU_FAULT_NONE),
        ("VU_FAULT_HEAD_RANGE", RingFault.HEAD_RANGE, _lib.VU_FAULT_HEAD_RANGE),
        ("VU_FAULT_NEXT_RANGE", RingFault.NEXT_RANGE, _lib.VU_FAULT_NEXT_RANGE),
        ("VU_FAULT_LOOP", RingFault.LOOP, _lib.VU_FAULT_LOOP),
        (
            "VU_FAULT_INDIRECT_NOT_NEGOTIATED",
            RingFault.INDIRECT_NOT_NEGOTIATED,
            _lib.VU_FAULT_INDIRECT_NOT_NEGOTIATED,
        ),
        (
            "VU_FAULT_INDIRECT_WITH_NEXT",
            RingFault.INDIRECT_WITH_NEXT,
            _lib.VU_FAULT_INDIRECT_WITH_NEXT,
        ),
        (
            "VU_FAULT_INDIRECT_NESTED",
            RingFault.INDIRECT_NESTED,
            _lib.VU_FAULT_INDIRECT_NESTED,
        ),
        ("VU_FAULT_INDIRECT_LEN", RingFault.INDIRECT_LEN, _lib.VU_FAULT_INDIRECT_LEN),
        (
            "VU_FAULT_INDIRECT_UNMAPPED",
            RingFault.INDIRECT_UNMAPPED,
            _lib.VU_FAULT_INDIRECT_UNMAPPED,
        ),
        (
            "VU_FAULT_BUFFER_UNMAPPED",
            RingFault.BUFFER_UNMAPPED,
            _lib.VU_FAULT_BUFFER_UNMAPPED,
        ),
        (
            "VU_FAULT_TOTAL_OVERFLOW",
            RingFault.TOTAL_OVERFLOW,
            _lib.VU_FAULT_TOTAL_OVERFLOW,
        ),
        (
            "VU_FAULT_WRITABLE_ORDER",
            RingFault.WRITABLE_ORDER,
            _lib.VU_FAULT_WRITABLE_ORDER,
        ),
        (
            "VU_FAULT_TOO_MANY_SEGMENTS",
            RingFault.TOO_MANY_SEGMENTS,
            _lib.VU_FAULT_TOO_MANY_SEGMENTS,
        ),
        ("VU_FAULT_ID_RANGE", RingFault.ID_RANGE, _lib.VU_FAULT_ID_RANGE),
        ("VU_FAULT_IN_FLIGHT", RingFault.IN_FLIGHT, _lib.VU_FAULT_IN_FLIGHT),
        (
            "VU_FAULT_NOT_IN_FLIGHT",
            RingFault.NOT_IN_FLIGHT,
            _lib.VU_FAULT_NOT_IN_FLIGHT,
        ),
        ("VU_FAULT_USED_LEN", RingFault.USED_LEN, _lib.VU_FAULT_USED_LEN),
    ]
    wrong = [f"{name} is {c}, expected {py}" for name, py, c in pairs if py != c]
    if wrong or len(RingFault) != 17 or len(RingStop) != 7:
        raise NativeHelperError(
            f"the compiled helper vubackend._native._atomics disagrees with this "
            f"facade: {'; '.join(wrong) or 'enum sizes'}; {_REMEDY}"
        )


_check_ring_constants()


class TableReleasedError(ValueError):
    """The region table was released (its ring moved on to a new memory
    table). Whoever holds chains of it pins the regions again."""


@final
class RegionTable:
    """The guest memory regions, pinned, in the form the C ring walks read.

    Build one per memory snapshot and keep it while the snapshot is in use.
    Each region's buffer is pinned here (a pinned mmap cannot be closed, so
    the memory stays mapped for as long as the table is alive, whatever
    happens to the snapshot); :meth:`release` unpins them. Release must not
    race with a ring walk that uses the table (the queue serialises them);
    chain copies may race with it (see :meth:`release`).
    """

    __slots__ = ("_count", "_gpas", "_pins", "_table")

    def __init__(self, regions: Sequence[tuple[int, Buffer]]) -> None:
        """Pin the regions.

        Args:
            regions: ``(gpa, buffer)`` per region, sorted by guest physical
                address: ``buffer`` is the region's writable, C-contiguous
                memory (``MappedRegion.view``), ``gpa`` its first guest
                physical address.

        Raises:
            TypeError: a buffer is read-only or not C-contiguous.
            ValueError: a region is empty, starts below 0, ends above 2**64,
                or is out of order or overlaps the one before it.
        """
        pins: list[FFI.CData] = []
        gpas: list[int] = []
        if len(regions) > _MAX_REGIONS:
            raise ValueError(f"{len(regions)} regions; at most {_MAX_REGIONS}")
        try:
            end = 0
            for gpa, buffer in regions:
                pin = _pin(buffer, "region buffer")
                pins.append(pin)
                size = len(pin)
                if size == 0:
                    raise ValueError(f"region at {gpa:#x} is empty")
                if gpa < end:
                    raise ValueError(
                        f"region at {gpa:#x} is out of order or overlaps the one "
                        f"before it (which ends at {end:#x})"
                    )
                if gpa + size > _U64_LIMIT:
                    raise ValueError(f"region at {gpa:#x} runs past 2**64")
                gpas.append(gpa)
                end = gpa + size
            table = _ffi.new("vu_region[]", len(pins))
            for i, pin in enumerate(pins):
                table[i].gpa = gpas[i]
                table[i].size = len(pin)
                table[i].host = pin
        except BaseException:
            for pin in pins:
                _unpin(pin)
            raise
        self._pins = pins
        self._gpas = gpas
        self._table = table
        self._count = len(pins)

    def __len__(self) -> int:
        return len(self._gpas)

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._count < 0

    def _check(self) -> FFI.CData:
        if self._count < 0:
            raise TableReleasedError("region table released")
        return self._table

    def release(self) -> None:
        """Unpin every region; the table refuses later use. Idempotent.

        The pins are dropped, not force-released: a chain copy running on
        another thread (``chain_copy``, ``chain_file_io``) holds them until
        it returns, so the memory it copies cannot be unmapped under it.
        Otherwise they go at once (nothing else refers to them).
        """
        if self._count < 0:
            return
        self._count = -1
        self._pins = []

    def __repr__(self) -> str:
        state = "released" if self._count < 0 else f"{self._count} regions"
        return f"<RegionTable {state}>"


class PopResult(NamedTuple):
    """What a batch pop did.

    Attributes:
        stop: why it stopped.
        chains: ``CHAIN_WORDS`` u32 words per popped chain (see
            :data:`CHAIN_WORDS`).
        segments: two words per buffer segment: the offset in its region, then
            ``len | region_index << 32 | writable << 63``.
        next_avail: the new next-available position (split index, or packed
            slot).
        avail_wrap: the new packed available wrap counter (split: 0).
        avail_idx: split: the last ``avail.idx`` read (packed: 0).
        fault: with ``stop == FAULT``, what was wrong.
        detail: the fault's detail (an index, length or address), the
            ``avail.idx`` that broke the ring, or the ring address for
            ``stop == RING``.
        where: with ``stop == FAULT``, the split head index or packed slot of
            the faulty chain.
    """

    stop: RingStop
    chains: array[int]
    segments: array[int]
    next_avail: int
    avail_wrap: int
    avail_idx: int
    fault: RingFault
    detail: int
    where: int


class PushResult(NamedTuple):
    """What a batch push did.

    Attributes:
        stop: ``EMPTY`` on success, ``FAULT`` (nothing written) or ``RING``.
        written: used elements (split) or used descriptors (packed) written.
        next_used: the new next-used position.
        used_wrap: the new packed used wrap counter (split: 0).
        fault: with ``stop == FAULT``, what was wrong with the entry.
        detail: the entry's id, or the ring address for ``stop == RING``.
        where: the index of the faulty entry in the batch.
    """

    stop: RingStop
    written: int
    next_used: int
    used_wrap: int
    fault: RingFault
    detail: int
    where: int


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{what} {value:#x} is not a u64")
