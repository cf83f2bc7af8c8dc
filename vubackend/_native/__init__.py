"""vubackend._native: typed facade over the compiled C helper (``_atomics``).

Ring indices, descriptor flags and the dirty log live in memory shared with
another process, so their ordering and atomicity cannot be left to Python
(docs/design.md, "Ordering and atomics are not Python's"). This module gives
the layers above (``bitmap``, ``memory``, ``vring``; an import-linter contract
keeps everyone else out) the few primitives they need:

* ``fence_acquire``, ``fence_release``, ``fence_seq_cst``: C11 thread fences.
* :class:`AtomicView`: a pinned writable buffer (usually a guest-memory mmap)
  with bounds-checked atomic loads/stores, an atomic fetch-or on bytes, and
  copies in and out that run without the GIL.
* :func:`copy`: a bounds-checked, GIL-free copy between any two buffers.
* :func:`chain_copy`, :func:`chain_file_io`: a popped chain's bytes to or
  from a buffer or a file (preadv/pwritev), in one GIL-free call whatever
  the number of descriptors.
* :class:`RegionTable`, :class:`RingWalker`: the batch operations of the
  virtqueue layer (pop many descriptor chains, push many used elements) in
  one C call each. The C side checks every guest-controlled number itself
  (see "Ring walks" in ``_cffi_src/native.c``); this facade checks what
  Python hands in (table order and bounds, capacities, queue size,
  positions).

Rules of this module:

1. **Python checks, C trusts.** The C functions take a base pointer and a byte
   offset and check nothing. Every offset, length, value and alignment is
   checked here before the C call: a missed check corrupts memory. Out of range
   (negative offset or length, past the end) raises ``IndexError``;
   misalignment and out-of-range values raise ``ValueError``. The ring walks
   split the work: what Python hands in (region table, capacities, queue
   size, positions) is checked here; what comes from guest memory
   (indices, addresses, lengths, flags) is checked by the C code itself,
   against the region table, because only C reads it.
2. **Natural alignment is of the address, not the offset.** u16/u32 accesses
   are single-copy atomic only when ``base + offset`` is aligned, so the check
   uses the real address (for an mmap, page aligned, it is the offset's).
3. **No ``ffi.cast`` on the hot path.** The base pointer is taken once, with
   ``ffi.from_buffer``, when the view is created.
4. **Pinning.** ``ffi.from_buffer`` holds a buffer export: ``mmap.close()``
   raises ``BufferError`` until :meth:`AtomicView.release` is called. A
   released view refuses every call with ``ValueError("view released")`` (the
   C side would otherwise write through a dangling pointer).
5. **The GIL is released around every C call** (cffi API mode), so a copy
   that blocks on a userfaultfd page fault (postcopy) never stalls the other
   Python threads (docs/design.md, "Postcopy and the GIL").
6. Every fence and acquire/release call has an ``# ORDERING:`` comment on the
   line above; "§5.4 rule N" there means docs/reference/vhost-user-protocol.md.
7. The compiled module is imported as a submodule object
   (``from vubackend._native import _atomics``; docs/style.md §5 item 8) and its
   ABI number is checked at import; a missing or stale build raises
   :class:`~vubackend.errors.NativeHelperError`.

Buffers are typed with ``typing_extensions.Buffer`` (``collections.abc.Buffer``
from Python 3.12), imported for type checking only: at run time nothing new
is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

from vubackend.errors import NativeHelperError

if TYPE_CHECKING:
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
    "RING_PEEK",
    "AtomicView",
    "PopResult",
    "PushResult",
    "RegionTable",
    "RingFault",
    "RingStop",
    "RingWalker",
    "TableReleasedError",
    "chain_copy",
    "chain_file_io",
    "chain_write",
    "chains_fill",
    "chains_forward",
    "copy",
    "fence_acquire",
    "fence_release",
    "fence_seq_cst",
    "inflight_tracking",
    "log_chains",
    "pin_records",
    "pin_segments",
    "records_sum",
]

# The ABI number this facade was written against; native.c defines the same.
_ABI: Final = 5
_REMEDY: Final = "reinstall vubackend with `pip install .` (or `pip install -e .`)"

try:
    from vubackend._native import _atomics
except ImportError as exc:
    raise NativeHelperError(
        f"the compiled helper vubackend._native._atomics is missing or cannot "
        f"be loaded ({exc}); {_REMEDY}"
    ) from exc

try:
    _found_abi = _atomics.lib.VU_NATIVE_ABI
except AttributeError as exc:
    raise NativeHelperError(
        f"the compiled helper vubackend._native._atomics has no VU_NATIVE_ABI; "
        f"{_REMEDY}"
    ) from exc
if _found_abi != _ABI:
    raise NativeHelperError(
        f"the compiled helper vubackend._native._atomics has ABI {_found_abi}, "
        f"this vubackend needs ABI {_ABI}; {_REMEDY}"
    )
# A stale build whose ABI number was not bumped: name what is missing rather
# than fail below with an AttributeError.
_missing = sorted(
    {
        "vu_chain_copy",
        "vu_chain_file_io",
        "vu_chain_write",
        "vu_chains_fill",
        "vu_chains_forward",
        "vu_log_chains",
        "vu_copy",
        "vu_fence_acquire",
        "vu_fence_load_u16",
        "vu_fence_release",
        "vu_fence_seq_cst",
        "vu_load_u8_acquire",
        "vu_load_u16_acquire",
        "vu_load_u32_acquire",
        "vu_or_u8",
        "vu_packed_pop",
        "vu_packed_push",
        "vu_records_sum",
        "vu_ring_complete",
        "vu_ring_complete1",
        "vu_ring_complete_records",
        "vu_ring_pop",
        "vu_ring_push",
        "vu_ring_push1",
        "vu_split_pop",
        "vu_split_push",
        "vu_store_u16_release",
        "vu_store_u32_release",
    }
    - set(dir(_atomics.lib))
)
if _missing:
    raise NativeHelperError(
        f"the compiled helper vubackend._native._atomics lacks "
        f"{', '.join(_missing)}; {_REMEDY}"
    )

_ffi: Final = _atomics.ffi
_lib: Final = _atomics.lib

# Bound once: a module global is cheaper to reach than an attribute of `lib`.
# The rules cited below are docs/reference/vhost-user-protocol.md §5.4.
# ORDERING: acquire loads of indices/flags that publish data (§5.4 rules 1, 2).
_load_u8_acquire: Final = _lib.vu_load_u8_acquire
# ORDERING: acquire loads of indices/flags that publish data (§5.4 rules 1, 2).
_load_u16_acquire: Final = _lib.vu_load_u16_acquire
# ORDERING: acquire loads of indices/flags that publish data (§5.4 rules 1, 2).
_load_u32_acquire: Final = _lib.vu_load_u32_acquire
# ORDERING: release stores that publish data written before them (§5.4 rule 4).
_fence_load_u16: Final = _lib.vu_fence_load_u16
_store_u16_release: Final = _lib.vu_store_u16_release
# ORDERING: release stores that publish data written before them (§5.4 rule 4).
_store_u32_release: Final = _lib.vu_store_u32_release
_or_u8: Final = _lib.vu_or_u8
_copy: Final = _lib.vu_copy
_from_buffer: Final = _ffi.from_buffer
_unpin: Final = _ffi.release

# ---------------------------------------------------------------- fences

# ORDERING: the public fences; callers cite the rule at each call site.
fence_acquire: Final = _lib.vu_fence_acquire
"""``atomic_thread_fence(memory_order_acquire)``: no load or store after it
moves before a load before it. E.g. check every packed-ring flag of a batch,
then one acquire fence, then read the descriptors (vhost-user-protocol.md §5.4
rule 2)."""

# ORDERING: the public fences; callers cite the rule at each call site.
fence_release: Final = _lib.vu_fence_release
"""``atomic_thread_fence(memory_order_release)``: no load or store before it
moves after a store after it. E.g. write the data, fence, then set the
dirty-log bits (vhost-user-protocol.md §5.4 rules 4 and 7)."""

# ORDERING: the public fences; callers cite the rule at each call site.
fence_seq_cst: Final = _lib.vu_fence_seq_cst
"""``atomic_thread_fence(memory_order_seq_cst)``: a full barrier (``mfence`` or a
locked instruction on x86-64), the only one that orders a store before a later
load. E.g. publish ``used.idx``, fence, then read ``avail.flags`` /
``used_event``; or re-enable notifications, fence, then re-check ``avail.idx``
(vhost-user-protocol.md §5.4 rules 5 and 6)."""


_RELEASED: Final = "view released"


def _pin(buffer: Buffer, what: str) -> FFI.CData:
    """Pin a writable, C-contiguous buffer as ``uint8_t[]`` with a clear error."""
    try:
        return _from_buffer("uint8_t[]", buffer, require_writable=True)
    except (BufferError, TypeError) as exc:
        raise TypeError(
            f"{what} must be a writable C-contiguous buffer (an mmap opened for "
            f"writing, a bytearray, or a memoryview of one), got "
            f"{type(buffer).__name__}: {exc}"
        ) from exc


def _pin_readonly(buffer: Buffer, what: str) -> FFI.CData:
    """Pin a C-contiguous buffer (read-only is fine) as ``uint8_t[]``."""
    try:
        return _from_buffer("uint8_t[]", buffer)
    except (BufferError, TypeError) as exc:
        raise TypeError(
            f"{what} must be a C-contiguous buffer, got {type(buffer).__name__}: {exc}"
        ) from exc


@final
class AtomicView:
    """A writable buffer pinned for atomic, bounds-checked access by byte offset.

    Create one per mapping (a guest-memory region, the dirty log, a test
    ``bytearray``) and keep it: the base pointer is taken once, here. All
    methods may be called from several threads at once, with one exception:
    :meth:`release` must not race with other calls on the same view (the
    caller quiesces its users first, as ``GuestMemory`` teardown does).

    Errors shared by the methods: a released view raises
    ``ValueError("view released")``; a range outside ``[0, size)`` (negative
    offset or length included) raises ``IndexError``; a u16/u32 address that
    is not naturally aligned, or a value that does not fit, raises
    ``ValueError``.
    """

    __slots__ = ("_end", "_ptr", "_r2", "_r4", "_size")

    def __init__(self, buffer: Buffer) -> None:
        """Pin ``buffer``.

        Args:
            buffer: a writable, C-contiguous buffer: an ``mmap`` opened for
                writing, a ``bytearray``, or a ``memoryview`` of one. While the
                view is alive the buffer cannot be resized or closed.

        Raises:
            TypeError: the buffer is read-only (``bytes``, an ``mmap`` opened
                with ``ACCESS_READ``), not C-contiguous, or not a buffer.
        """
        self._ptr = _pin(buffer, "AtomicView buffer")
        self._size = len(self._ptr)
        addr = int(_ffi.cast("uintptr_t", self._ptr))
        # base + offset is aligned iff offset % w == (-base) % w; keeping the
        # residues (0 for an mmap) makes the hot-path check one `&` on a small
        # int instead of a big-int addition.
        self._r2 = -addr % 2
        self._r4 = -addr % 4
        # Upper bound used by every range check; -1 once released, so that a
        # single comparison refuses everything after release().
        self._end = self._size

    def _fail(self, offset: int, length: int) -> Exception:
        # Slow path of every check: say what was wrong.
        if self._end < 0:
            return ValueError(_RELEASED)
        return IndexError(
            f"range [{offset}, {offset} + {length}) is outside the view of "
            f"{self._size} bytes"
        )

    @property
    def size(self) -> int:
        """The size of the pinned buffer in bytes.

        Raises:
            ValueError: the view was released.
        """
        if self._end < 0:
            raise ValueError(_RELEASED)
        return self._size

    # ------------------------------------------------------------ loads/stores

    def load_u8(self, offset: int) -> int:
        """Atomically load the byte at ``offset``, with acquire ordering.

        Raises:
            IndexError: ``offset`` is outside the view.
            ValueError: the view was released.
        """
        if not 0 <= offset < self._end:
            raise self._fail(offset, 1)
        # ORDERING: acquire: later reads see all the writer did before its release.
        return _load_u8_acquire(self._ptr, offset)

    def load_u16(self, offset: int) -> int:
        """Atomically load the native-endian u16 at ``offset`` with acquire
        ordering (e.g. ``avail.idx``, packed-ring ``flags``). Virtio rings are
        little-endian, like x86-64; this is a native load.

        Raises:
            IndexError: ``[offset, offset + 2)`` is outside the view.
            ValueError: the address is not 2-byte aligned, or the view was
                released.
        """
        if not 0 <= offset <= self._end - 2:
            raise self._fail(offset, 2)
        if offset & 1 != self._r2:
            raise ValueError(f"u16 access at offset {offset} is not 2-byte aligned")
        # Reads of ring entries after this load must see what the peer wrote
        # before it published the index or flag (§5.4 rules 1 and 2).
        # ORDERING: acquire: later reads see all the writer did before its release.
        return _load_u16_acquire(self._ptr, offset)

    def fence_load_u16(self, offset: int) -> int:
        """A sequentially consistent fence, then :meth:`load_u16`, in one
        native call: the "publish ours, then read theirs" step of the
        notification handshakes (§5.4 rules 5 and 6).

        Raises:
            IndexError: ``[offset, offset + 2)`` is outside the view.
            ValueError: the address is not 2-byte aligned, or the view was
                released.
        """
        if not 0 <= offset <= self._end - 2:
            raise self._fail(offset, 2)
        if offset & 1 != self._r2:
            raise ValueError(f"u16 access at offset {offset} is not 2-byte aligned")
        # ORDERING: seq_cst fence, then acquire load (§5.4 rules 5 and 6).
        return _fence_load_u16(self._ptr, offset)

    def store_u16(self, offset: int, value: int) -> None:
        """Atomically store the native-endian u16 ``value`` at ``offset`` with
        release ordering (e.g. ``used.idx``, packed-ring ``flags``).

        Raises:
            IndexError: ``[offset, offset + 2)`` is outside the view.
            ValueError: the address is not 2-byte aligned, ``value`` is not in
                ``0..0xffff``, or the view was released.
        """
        if not 0 <= offset <= self._end - 2:
            raise self._fail(offset, 2)
        if offset & 1 != self._r2:
            raise ValueError(f"u16 access at offset {offset} is not 2-byte aligned")
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"u16 value {value} is outside 0..0xffff")
        # The peer must see every write made before this store (data, used
        # elements) once it sees the value (§5.4 rule 4).
        # ORDERING: release: a reader that sees the value sees all writes before it.
        _store_u16_release(self._ptr, offset, value)

    def load_u32(self, offset: int) -> int:
        """Atomically load the native-endian u32 at ``offset`` with acquire
        ordering.

        Raises:
            IndexError: ``[offset, offset + 4)`` is outside the view.
            ValueError: the address is not 4-byte aligned, or the view was
                released.
        """
        if not 0 <= offset <= self._end - 4:
            raise self._fail(offset, 4)
        if offset & 3 != self._r4:
            raise ValueError(f"u32 access at offset {offset} is not 4-byte aligned")
        # ORDERING: acquire: later reads see all the writer did before its release.
        return _load_u32_acquire(self._ptr, offset)

    def store_u32(self, offset: int, value: int) -> None:
        """Atomically store the native-endian u32 ``value`` at ``offset`` with
        release ordering.

        Raises:
            IndexError: ``[offset, offset + 4)`` is outside the view.
            ValueError: the address is not 4-byte aligned, ``value`` is not in
                ``0..0xffffffff``, or the view was released.
        """
        if not 0 <= offset <= self._end - 4:
            raise self._fail(offset, 4)
        if offset & 3 != self._r4:
            raise ValueError(f"u32 access at offset {offset} is not 4-byte aligned")
        if not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(f"u32 value {value} is outside 0..0xffffffff")
        # ORDERING: release: a reader that sees the value sees all writes before it.
        _store_u32_release(self._ptr, offset, value)

    def or_u8(self, offset: int, mask: int) -> int:
        """Atomically OR ``mask`` into the byte at ``offset`` (sequentially
        consistent fetch-or) and return the byte as it was before.

        Used for dirty-log bits, which the frontend clears concurrently
        (vhost-user-protocol.md §4.7 and §5.4 rule 7). As a seq_cst
        read-modify-write it is also a full barrier.

        Raises:
            IndexError: ``offset`` is outside the view.
            ValueError: ``mask`` is not in ``0..255``, or the view was released.
        """
        if not 0 <= offset < self._end:
            raise self._fail(offset, 1)
        if not 0 <= mask <= 0xFF:
            raise ValueError(f"u8 mask {mask} is outside 0..255")
        return _or_u8(self._ptr, offset, mask)

    # ------------------------------------------------------------ copies

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes starting at ``offset`` out of the view.

        The copy from the view runs without the GIL (safe on postcopy memory,
        where it may block on a page fault). It is a plain copy: no ordering
        and no atomicity beyond single bytes.

        Raises:
            IndexError: ``[offset, offset + length)`` is outside the view or
                ``length`` is negative.
            ValueError: the view was released.
        """
        if not (length >= 0 and 0 <= offset <= self._end - length):
            raise self._fail(offset, length)
        out = bytearray(length)
        if length:
            _copy(_from_buffer("uint8_t[]", out), 0, self._ptr, offset, length)
        return bytes(out)

    def read_into(self, offset: int, out: Buffer) -> int:
        """Copy ``len(out)`` bytes (its size in bytes) starting at ``offset``
        into the writable buffer ``out``, without the GIL.

        Returns:
            The number of bytes copied, the byte size of ``out``.

        Raises:
            TypeError: ``out`` is read-only or not C-contiguous.
            IndexError: the range is outside the view.
            ValueError: the view was released.
        """
        dst = _pin(out, "read_into destination")
        try:
            length = len(dst)
            if not 0 <= offset <= self._end - length:
                raise self._fail(offset, length)
            if length:
                _copy(dst, 0, self._ptr, offset, length)
            return length
        finally:
            _unpin(dst)

    def write(self, offset: int, data: Buffer) -> None:
        """Copy all of ``data`` (any C-contiguous buffer) into the view at
        ``offset``, without the GIL. A plain copy: publish it with a release
        store or fence afterwards.

        Raises:
            TypeError: ``data`` is not a C-contiguous buffer.
            IndexError: the range is outside the view.
            ValueError: the view was released.
        """
        src = _pin_readonly(data, "write source")
        try:
            length = len(src)
            if not 0 <= offset <= self._end - length:
                raise self._fail(offset, length)
            if length:
                _copy(self._ptr, offset, src, 0, length)
        finally:
            _unpin(src)

    # ------------------------------------------------------------ lifetime

    def release(self) -> None:
        """Unpin the buffer (an mmap can be closed afterwards). Idempotent.

        Every later call on the view raises ``ValueError("view released")``.
        Must not run while another thread is inside a call on this view.
        """
        if self._end < 0:
            return
        self._end = -1
        _unpin(self._ptr)

    def __enter__(self) -> AtomicView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._end < 0 else f"size={self._size}"
        return f"<AtomicView {state}>"


def copy(
    dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, length: int
) -> None:
    """Copy ``length`` bytes from ``src[src_offset:]`` to ``dst[dst_offset:]``
    without the GIL (``memmove``: overlapping ranges of one buffer are fine).

    Both buffers are pinned for the duration of the call only.

    Args:
        dst: a writable C-contiguous buffer.
        dst_offset: byte offset into ``dst``.
        src: a C-contiguous buffer (read-only is fine).
        src_offset: byte offset into ``src``.
        length: number of bytes.

    Raises:
        TypeError: ``dst`` is read-only, or a buffer is not C-contiguous.
        IndexError: a range falls outside its buffer, or ``length`` or an
            offset is negative.
    """
    d = _pin(dst, "copy destination")
    try:
        s = _pin_readonly(src, "copy source")
        try:
            if length < 0:
                raise IndexError(f"copy length {length} is negative")
            if not 0 <= dst_offset <= len(d) - length:
                raise IndexError(
                    f"destination range [{dst_offset}, {dst_offset} + {length}) "
                    f"is outside its {len(d)} bytes"
                )
            if not 0 <= src_offset <= len(s) - length:
                raise IndexError(
                    f"source range [{src_offset}, {src_offset} + {length}) "
                    f"is outside its {len(s)} bytes"
                )
            if length:
                _copy(d, dst_offset, s, src_offset, length)
        finally:
            _unpin(s)
    finally:
        _unpin(d)


# The ring walks live in their own module; imported last, once the helper
# has passed the checks above.
from vubackend._native import _track as inflight_tracking  # noqa: E402
from vubackend._native._chains import (  # noqa: E402
    chain_copy,
    chain_file_io,
    chain_write,
    chains_fill,
    chains_forward,
    log_chains,
    pin_records,
    pin_segments,
    records_sum,
)
from vubackend._native._rings import (  # noqa: E402
    CHAIN_WORDS,
    MAX_CHAIN_SEGMENTS,
    MAX_INDIRECT,
    MAX_QUEUE_SIZE,
    PEEK_BYTES,
    RING_AVAIL_EVENT,
    RING_EVENT_IDX,
    RING_IN_ORDER,
    RING_INDIRECT,
    RING_PEEK,
    PopResult,
    PushResult,
    RegionTable,
    RingFault,
    RingStop,
    TableReleasedError,
)
from vubackend._native._walker import RingWalker  # noqa: E402
