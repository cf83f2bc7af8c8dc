# Moving a popped chain's bytes in one call: chain_copy (to or from a flat
# buffer) and chain_file_io (to or from a file, preadv/pwritev), over the
# segment words of a walk (pinned with pin_segments) and the pinned
# RegionTable it walked against.
#
# Rules of this module:
# - Imported by vubackend._native after the helper passed its ABI checks,
#   like _rings.py, whose RegionTable it uses.
# - Python checks what only it can know (the table is live, the buffer is
#   writable when it is the destination); C checks the rest before anything
#   moves: the segment range against the array's length, every segment
#   against its region (native.c, "chain data"). cffi refuses a negative
#   number for an unsigned parameter (OverflowError).
# - The GIL is released during the C call. A table released by another
#   thread meanwhile cannot unmap the memory under the copy: each call holds
#   the table's pins (read before the liveness check) until it returns;
#   RegionTable.release marks the table, then drops its references only.
# - These run once or twice per request: the checks are one expression, the
#   messages are built only on the failing path.

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Final

from vubackend._native import _atomics
from vubackend._native._rings import RegionTable, TableReleasedError

if TYPE_CHECKING:
    from array import array
    from collections.abc import Callable

    from cffi import FFI
    from typing_extensions import Buffer

    from vubackend._native import AtomicView

__all__ = [
    "chain_copy",
    "chain_file_io",
    "chain_write",
    "chains_fill",
    "chains_forward",
    "log_chains",
    "pin_records",
    "pin_segments",
    "records_sum",
]

_ffi: Final = _atomics.ffi
_from_buffer: Final = _ffi.from_buffer
_copy: Final = _atomics.lib.vu_chain_copy
_write: Final = _atomics.lib.vu_chain_write
_file_io: Final = _atomics.lib.vu_chain_file_io
_records_sum: Final = _atomics.lib.vu_records_sum
_fill: Final = _atomics.lib.vu_chains_fill
_forward: Final = _atomics.lib.vu_chains_forward
_log: Final = _atomics.lib.vu_log_chains
_CHAIN_WORDS: Final = _atomics.lib.VU_CHAIN_WORDS


def pin_segments(segs: array[int]) -> FFI.CData:
    """Pin a walk's segment words (``array('Q')``, 2 per segment: the offset
    in the region, then ``len | region << 32 | writable << 63``) for the
    copies below; the array cannot be resized while the pointer lives.

    Raises:
        TypeError: ``segs`` is not an ``array('Q')``.
    """
    if getattr(segs, "typecode", None) != "Q":
        raise TypeError("segment words must be an array('Q')")
    return _from_buffer("uint64_t[]", segs)


def pin_records(words: array[int]) -> FFI.CData:
    """Pin a pop's chain records (``array('I')``, ``CHAIN_WORDS`` per chain)
    for :func:`records_sum` and ``RingWalker.complete_records``; the array
    cannot be resized while the pointer lives.

    Raises:
        TypeError: ``words`` is not an ``array('I')``.
    """
    if getattr(words, "typecode", None) != "I":
        raise TypeError("chain records must be an array('I')")
    return _from_buffer("uint32_t[]", words)


def records_sum(records: FFI.CData, count: int, field: int, skip: int = 0) -> int:
    """The sum of word ``field`` (5: readable bytes, 6: writable bytes) over
    the first ``count`` chain records, each less ``skip`` (a header; a chain
    shorter counts 0), in one call.

    Raises:
        IndexError: ``count`` records do not fit in ``records``, or ``field``
            is not a record word.
        OverflowError: a negative ``count`` or ``skip``.
    """
    if count * _CHAIN_WORDS > len(records) or not 0 <= field < _CHAIN_WORDS:
        raise IndexError(
            f"{count} records, word {field}: outside {len(records)} record words"
        )
    return _records_sum(records, count, field, skip)


def _failed(result: int, what: str) -> Exception:
    code = -result
    if code == errno.ERANGE:
        return IndexError(f"{what}: the segment range is outside the batch")
    if code == errno.EFAULT:
        return OSError(code, f"{what}: a segment lies outside its memory region")
    return OSError(code, f"{what}: {os.strerror(code)}")


def chain_copy(
    table: RegionTable,
    segs: FFI.CData,
    nsegs: int,
    first: int,
    count: int,
    skip: int,
    buffer: Buffer,
    to_chain: bool,
) -> int:
    """Copy between segments ``[first, first + count)`` of a walk, from byte
    ``skip`` of them on, and ``buffer``, without the GIL.

    Args:
        table: the region table the segments were walked against (live).
        segs: the walk's segment words, from :func:`pin_segments`.
        nsegs: how many segments ``segs`` holds.
        first: the first segment of the part (readable or writable).
        count: its number of segments.
        skip: bytes of the part to pass over (a cursor).
        buffer: the flat side: copied from when ``to_chain``, else into (then
            it must be writable).
        to_chain: the direction.

    Returns:
        Bytes copied: ``len(buffer)``, or fewer at the end of the part.

    Raises:
        TableReleasedError: the table was released.
        IndexError: the segment range is out of range.
        OverflowError: a number is negative.
        TypeError: ``buffer`` is not C-contiguous, or read-only when written.
        OSError: a segment lies outside its region (EFAULT).
    """
    keep = table._pins  # held until we return, whoever releases the table
    if table._count < 0:
        raise TableReleasedError("region table released")
    if to_chain:
        flat = _from_buffer("uint8_t[]", buffer)
    else:
        flat = _from_buffer("uint8_t[]", buffer, require_writable=True)
    result: int = _copy(
        table._table, table._count, segs, nsegs, first, count, skip, flat, len(flat),
        to_chain,
    )  # fmt: skip
    del keep
    if result < 0:
        raise _failed(result, "chain copy")
    return result


def chain_write(
    table: RegionTable,
    segs: FFI.CData,
    nsegs: int,
    first: int,
    count: int,
    skip: int,
    data: Buffer,
) -> int:
    """:func:`chain_copy` into the chain (``to_chain``), from any buffer;
    ``bytes`` are passed to C as they are, without pinning.

    Returns:
        Bytes copied: ``len(data)``, or fewer at the end of the part.

    Raises:
        As :func:`chain_copy`.
    """
    keep = table._pins
    if table._count < 0:
        raise TableReleasedError("region table released")
    if type(data) is bytes:
        result: int = _write(
            table._table, table._count, segs, nsegs, first, count, skip, data,
            len(data),
        )  # fmt: skip
    else:
        src = _from_buffer("uint8_t[]", data)
        result = _write(
            table._table, table._count, segs, nsegs, first, count, skip, src,
            len(src),
        )  # fmt: skip
    del keep
    if result < 0:
        raise _failed(result, "chain write")
    return result


def chain_file_io(
    fd: int,
    table: RegionTable,
    segs: FFI.CData,
    nsegs: int,
    first: int,
    count: int,
    skip: int,
    length: int,
    offset: int,
    to_chain: bool,
) -> int:
    """Read a file into the segments (``to_chain``: preadv) or write them to
    it (pwritev), at most ``length`` bytes from byte ``skip`` of the part on,
    at file position ``offset``; without the GIL. Arguments as
    :func:`chain_copy`.

    Returns:
        Bytes moved; fewer than ``length`` at the end of the part, at the end
        of the file, or when a later system call failed.

    Raises:
        TableReleasedError: the table was released.
        IndexError: the segment range is out of range.
        OverflowError: a number is negative.
        OSError: the first system call failed (EINVAL for a negative file
            offset), or a segment lies outside its region (EFAULT).
    """
    keep = table._pins
    if table._count < 0:
        raise TableReleasedError("region table released")
    result: int = _file_io(
        fd, to_chain, table._table, table._count, segs, nsegs, first, count, skip,
        length, offset,
    )  # fmt: skip
    del keep
    if result < 0:
        raise _failed(
            result, "preadv into a chain" if to_chain else "pwritev of a chain"
        )
    return result


def _records_at(records: FFI.CData, first: int, count: int, what: str) -> FFI.CData:
    # Chains [first, first + count) of pinned records, as a pointer.
    if first < 0 or count < 0 or (first + count) * _CHAIN_WORDS > len(records):
        raise IndexError(
            f"{what} chains {first}..{first + count} are outside "
            f"{len(records) // _CHAIN_WORDS} records"
        )
    ptr: FFI.CData = records + first * _CHAIN_WORDS
    return ptr


def chains_fill(
    table: RegionTable,
    segs: FFI.CData,
    nsegs: int,
    records: FFI.CData,
    first: int,
    count: int,
    prefix: bytes,
    blob: bytes,
    lengths: array[int],
    used: array[int],
) -> int:
    """Fill chains ``[first, first + count)`` of a pop, one frame each, in
    one GIL-free call: chain ``first + k`` gets ``prefix``, then frame
    ``k`` (the next ``lengths[k]`` bytes of ``blob``); ``used[k]`` gets the
    bytes written. Stops at the first frame its chain cannot hold.

    Returns:
        The chains filled.

    Raises:
        TableReleasedError: the table was released.
        IndexError: the chains are outside the records, ``lengths`` or
            ``used`` are shorter than ``count``, the frames overrun
            ``blob``, or a segment range is outside the segments.
        OSError: a segment lies outside its region (EFAULT).
    """
    recs = _records_at(records, first, count, "filled")
    if len(lengths) < count or len(used) < count:
        raise IndexError(f"{count} chains, {len(lengths)} lengths, {len(used)} used")
    if sum(lengths[:count]) > len(blob):
        raise IndexError(f"{count} frames overrun the {len(blob)} bytes given")
    out = _from_buffer("uint32_t[]", used, require_writable=True)
    sizes = _from_buffer("uint32_t[]", lengths)
    return _on_table(
        table,
        "chain fill",
        lambda regions, n: _fill(
            regions,
            n,
            segs,
            nsegs,
            recs,
            count,
            prefix,
            len(prefix),
            blob,
            len(blob),
            sizes,
            out,
        ),
    )


def chains_forward(
    table: RegionTable,
    src: tuple[FFI.CData, int, FFI.CData, int],
    dst: tuple[FFI.CData, int, FFI.CData, int],
    count: int,
    skip: int,
    prefix: bytes,
    used: array[int],
) -> int:
    """Chain ``k`` of ``dst`` gets ``prefix``, then the readable bytes of
    chain ``k`` of ``src`` after its first ``skip``, for ``k`` in
    ``range(count)``, in one GIL-free call; ``used[k]`` gets the bytes
    written. ``src`` and ``dst`` are ``(segs, nsegs, records, first)``, both
    walked against ``table``. Stops at the first source chain with nothing
    after ``skip``, or whose frame the destination chain cannot hold.

    Returns:
        The chains filled.

    Raises:
        As :func:`chains_fill`.
    """
    src_segs, src_nsegs, src_records, src_first = src
    dst_segs, dst_nsegs, dst_records, dst_first = dst
    src_recs = _records_at(src_records, src_first, count, "source")
    dst_recs = _records_at(dst_records, dst_first, count, "destination")
    if len(used) < count:
        raise IndexError(f"{count} chains, {len(used)} used")
    out = _from_buffer("uint32_t[]", used, require_writable=True)
    return _on_table(
        table,
        "chain forward",
        lambda regions, n: _forward(
            regions,
            n,
            src_segs,
            src_nsegs,
            src_recs,
            dst_segs,
            dst_nsegs,
            dst_recs,
            count,
            skip,
            prefix,
            len(prefix),
            out,
        ),
    )


def log_chains(
    log: AtomicView,
    table: RegionTable,
    segs: FFI.CData,
    nsegs: int,
    records: FFI.CData,
    first: int,
    count: int,
    used: array[int],
) -> int:
    """Mark in the dirty log viewed by ``log`` (one bit per 4 KiB guest
    physical page, the whole view) the first ``used[k]`` bytes of the
    writable part of chain ``first + k`` of a pop, for ``k`` in
    ``range(count)``, in one GIL-free call that starts with a release fence
    (the bits never show before the data). Nothing is marked unless every
    chain checks out. The caller keeps the log mapped (a lease).

    Returns:
        The pages past the end of the log (not marked).

    Raises:
        ValueError: the view was released.
        TableReleasedError: the table was released.
        IndexError: the chains are outside the records, ``used`` is shorter
            than ``count``, or a segment range is outside the segments.
        OSError: a segment lies outside its region, or ``used[k]`` is more
            than chain ``first + k`` can hold (EFAULT).
    """
    recs = _records_at(records, first, count, "logged")
    if len(used) < count:
        raise IndexError(f"{count} chains, {len(used)} used")
    ptr = log._ptr
    if log._end < 0:
        raise ValueError("view released")
    counts = _from_buffer("uint32_t[]", used)
    return _on_table(
        table,
        "dirty log of chains",
        lambda regions, n: _log(
            ptr, 8 * log._size, regions, n, segs, nsegs, recs, count, counts
        ),
    )


def _on_table(
    table: RegionTable, what: str, call: Callable[[FFI.CData, int], int]
) -> int:
    # A batch call on the table's regions, pinned for its duration (the
    # module's rules); a negative result is the errno of `what`.
    keep = table._pins
    if table._count < 0:
        raise TableReleasedError("region table released")
    result = call(table._table, table._count)
    del keep
    if result < 0:
        raise _failed(result, what)
    return result
