"""Single-threaded tests of vubackend._native against a Python model.

Every AtomicView method runs on three kinds of buffer: a bytearray, an
anonymous mmap (page aligned) and a memoryview of a bytearray that starts one
byte past an aligned address (so aligned offsets are misaligned addresses).
The model is plain Python: ``struct`` on a bytes snapshot, and the buffer's
address from ``ctypes`` (not from cffi, so the alignment check is tested
against an independent source). Every bound of every method is probed, and a
rejected call must leave the buffer untouched.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vubackend._native import (
    AtomicView,
    copy,
    fence_acquire,
    fence_release,
    fence_seq_cst,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from typing_extensions import Buffer

SIZE = 4096
# Offsets that must fail for any access of the given width, besides the
# range checks computed from SIZE in the tests: values that would wrap a
# 64-bit size_t or land on a small offset after truncation.
HUGE = [2**63, 2**64 - 1, 2**64, 2**64 + 2, 2**100, -(2**63), -(2**64)]


def address(buf: Buffer) -> int:
    """The buffer's base address, through ctypes (independent of cffi)."""
    with memoryview(buf) as mv:
        n = mv.nbytes
    arr = (ctypes.c_char * n).from_buffer(buf)
    try:
        return ctypes.addressof(arr)
    finally:
        del arr


def is_closed(m: mmap.mmap) -> bool:
    # A function, so that mypy does not narrow `m.closed` across close().
    return m.closed


def snapshot(buf: Buffer) -> bytes:
    """The buffer's bytes, through memoryview (independent of cffi)."""
    with memoryview(buf) as mv:
        return mv.tobytes()


class Target:
    """A buffer under test plus what the model needs to know about it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._mmap: mmap.mmap | None = None
        self.buf: bytearray | memoryview | mmap.mmap
        if kind == "bytearray":
            self.buf = bytearray(os.urandom(SIZE))
        elif kind == "mmap":
            self._mmap = mmap.mmap(-1, SIZE)
            self._mmap.write(os.urandom(SIZE))
            self.buf = self._mmap
        elif kind == "odd-base":
            backing = bytearray(os.urandom(SIZE + 8))
            start = 1 if address(backing) % 2 == 0 else 2
            self.buf = memoryview(backing)[start : start + SIZE]
        else:
            raise AssertionError(kind)
        self.addr = address(self.buf)

    def aligned(self, offset: int, width: int) -> bool:
        return (self.addr + offset) % width == 0

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()


@pytest.fixture(params=["bytearray", "mmap", "odd-base"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    t = Target(str(request.param))
    yield t
    t.close()


@pytest.fixture
def view(target: Target) -> Iterator[AtomicView]:
    v = AtomicView(target.buf)
    yield v
    v.release()


def test_odd_base_is_really_odd(target: Target) -> None:
    assert (target.addr % 2 == 1) == (target.kind == "odd-base")
    if target.kind == "mmap":
        assert target.addr % mmap.PAGESIZE == 0


def test_size(view: AtomicView) -> None:
    assert view.size == SIZE


# ---------------------------------------------------------------- fences


def test_fences_run() -> None:
    # ORDERING: nothing to order here; the test only checks the calls exist.
    fence_acquire()
    # ORDERING: as above.
    fence_release()
    # ORDERING: as above.
    fence_seq_cst()


# ---------------------------------------------------------------- loads/stores


def test_load_u8_matches_model(target: Target, view: AtomicView) -> None:
    model = snapshot(target.buf)
    assert [view.load_u8(i) for i in range(SIZE)] == list(model)


@pytest.mark.parametrize(("width", "fmt"), [(2, "=H"), (4, "=I")])
def test_loads_match_model(
    target: Target, view: AtomicView, width: int, fmt: str
) -> None:
    load = view.load_u16 if width == 2 else view.load_u32
    model = snapshot(target.buf)
    checked = 0
    for off in range(SIZE - width + 1):
        if target.aligned(off, width):
            assert load(off) == struct.unpack_from(fmt, model, off)[0]
            checked += 1
        else:
            with pytest.raises(ValueError, match="aligned"):
                load(off)
    assert checked >= SIZE // width - 1


def test_fenced_load_u16_matches_model(target: Target, view: AtomicView) -> None:
    # The seq_cst fence changes nothing a single thread can see: the value
    # and the checks are load_u16's.
    model = snapshot(target.buf)
    load = view.fence_load_u16  # the fence itself: nothing to order here
    for off in range(SIZE - 1):
        if target.aligned(off, 2):
            assert load(off) == struct.unpack_from("=H", model, off)[0]
        else:
            with pytest.raises(ValueError, match="aligned"):
                load(off)
    for off in (SIZE - 1, SIZE, -1, *HUGE):
        with pytest.raises((IndexError, ValueError)):
            load(off)


@pytest.mark.parametrize(("width", "fmt"), [(2, "=H"), (4, "=I")])
def test_stores_match_model(
    target: Target, view: AtomicView, width: int, fmt: str
) -> None:
    store = view.store_u16 if width == 2 else view.store_u32
    load = view.load_u16 if width == 2 else view.load_u32
    top = (1 << (8 * width)) - 1
    model = bytearray(snapshot(target.buf))
    values = [0, 1, top, top >> 1, 0x1234 & top, 0xDEADBEEF & top]
    for i, off in enumerate(
        o for o in range(SIZE - width + 1) if target.aligned(o, width)
    ):
        value = values[i % len(values)] ^ (i & top)
        store(off, value)
        struct.pack_into(fmt, model, off, value)
        assert load(off) == value
    assert snapshot(target.buf) == bytes(model)


def test_store_u16_little_endian_layout(target: Target, view: AtomicView) -> None:
    # Virtio rings are little-endian; the helper is native-endian, and this
    # project runs on x86-64. Fail loudly if that ever changes.
    off = 2 if target.aligned(2, 2) else 3
    view.store_u16(off, 0xA1B2)
    assert snapshot(target.buf)[off : off + 2] == b"\xb2\xa1"
    off = next(o for o in range(8, 16) if target.aligned(o, 4))
    view.store_u32(off, 0xA1B2C3D4)
    assert snapshot(target.buf)[off : off + 4] == b"\xd4\xc3\xb2\xa1"


def test_or_u8_matches_model(target: Target, view: AtomicView) -> None:
    model = bytearray(snapshot(target.buf))
    for off in range(SIZE):
        mask = (off * 37 + 11) & 0xFF
        assert view.or_u8(off, mask) == model[off]
        model[off] |= mask
    assert snapshot(target.buf) == bytes(model)
    # Zero mask: a pure read.
    assert view.or_u8(5, 0) == model[5]
    assert view.or_u8(6, 0xFF) == model[6]
    assert view.load_u8(6) == 0xFF


# ---------------------------------------------------------------- copies


def test_read_matches_model(target: Target, view: AtomicView) -> None:
    model = snapshot(target.buf)
    for off, n in [
        (0, 0),
        (0, 1),
        (0, SIZE),
        (1, SIZE - 1),
        (SIZE - 1, 1),
        (SIZE, 0),
        (100, 64),
        (4000, 96),
    ]:
        got = view.read(off, n)
        assert type(got) is bytes
        assert got == model[off : off + n]


def test_read_into_matches_model(target: Target, view: AtomicView) -> None:
    model = snapshot(target.buf)
    out = bytearray(64)
    assert view.read_into(100, out) == 64
    assert out == model[100:164]
    # Into a slice of a bigger buffer: only that slice changes.
    big = bytearray(b"\xee" * 200)
    assert view.read_into(SIZE - 50, memoryview(big)[10:60]) == 50
    assert big == b"\xee" * 10 + model[SIZE - 50 :] + b"\xee" * 140
    # Into an mmap and a non-byte format buffer (size counted in bytes).
    with mmap.mmap(-1, 4096) as m:
        assert view.read_into(0, m) == SIZE
        assert m[:] == model
    words = memoryview(bytearray(16)).cast("I")
    assert view.read_into(8, words) == 16
    assert words.tobytes() == model[8:24]
    assert view.read_into(SIZE, bytearray()) == 0


def test_write_matches_model(target: Target, view: AtomicView) -> None:
    model = bytearray(snapshot(target.buf))
    cases: list[tuple[int, Buffer]] = [
        (0, b""),
        (0, b"\x01"),
        (7, bytes(range(200))),
        (SIZE - 3, bytearray(b"xyz")),
        (SIZE, b""),
        (1000, memoryview(b"abcdefgh")[2:6]),
        (2000, memoryview(bytearray(b"\x00\x01\x02\x03" * 4)).cast("I")),
    ]
    for off, data in cases:
        view.write(off, data)
        raw = snapshot(data)
        model[off : off + len(raw)] = raw
        assert snapshot(target.buf) == bytes(model)
    whole = os.urandom(SIZE)
    view.write(0, whole)
    assert snapshot(target.buf) == whole


def test_write_from_mmap_source() -> None:
    with mmap.mmap(-1, 4096) as src:
        src.write(b"hello")
        dst = bytearray(16)
        with AtomicView(dst) as v:
            v.write(3, memoryview(src)[:5])
        assert dst[3:8] == b"hello"
        # The source was pinned only during the call: it closes now.
    assert src.closed


# ---------------------------------------------------------------- bounds


def _range_rejects(size: int, width: int) -> list[int]:
    """Offsets that put a width-byte access outside [0, size)."""
    return [-1, -width, size - width + 1, size - 1, size, size + 1, *HUGE]


@pytest.mark.parametrize("method", ["load_u8", "or_u8"])
def test_byte_ops_reject_out_of_range(
    target: Target, view: AtomicView, method: str
) -> None:
    before = snapshot(target.buf)
    op: Callable[[int], object] = (
        view.load_u8 if method == "load_u8" else (lambda off: view.or_u8(off, 0xFF))
    )
    for off in _range_rejects(SIZE, 1):
        if off == SIZE - 1:
            continue  # in range for one byte
        with pytest.raises(IndexError):
            op(off)
    assert snapshot(target.buf) == before


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("kind", ["load", "store"])
def test_word_ops_reject_out_of_range(
    target: Target, view: AtomicView, width: int, kind: str
) -> None:
    before = snapshot(target.buf)
    op: Callable[[int], object]
    if kind == "load":
        op = view.load_u16 if width == 2 else view.load_u32
    elif width == 2:
        op = lambda off: view.store_u16(off, 0xFFFF)  # noqa: E731
    else:
        op = lambda off: view.store_u32(off, 0xFFFF_FFFF)  # noqa: E731
    for off in _range_rejects(SIZE, width):
        # Range is checked before alignment: any misaligned offset here is
        # still out of range, so IndexError it must be.
        with pytest.raises(IndexError):
            op(off)
    # The last aligned in-range offset works; the next aligned one does not.
    last = max(o for o in range(SIZE - width + 1) if target.aligned(o, width))
    op(last)
    with pytest.raises(IndexError):
        op(last + width)
    if kind == "load":
        assert snapshot(target.buf) == before


@pytest.mark.parametrize("width", [2, 4])
def test_word_ops_reject_misaligned(
    target: Target, view: AtomicView, width: int
) -> None:
    before = snapshot(target.buf)
    load = view.load_u16 if width == 2 else view.load_u32
    store = view.store_u16 if width == 2 else view.store_u32
    misaligned = [o for o in range(0, 64) if not target.aligned(o, width)]
    misaligned += [
        o for o in range(SIZE - 64, SIZE - width + 1) if not target.aligned(o, width)
    ]
    assert len(misaligned) >= 32
    for off in misaligned:
        with pytest.raises(ValueError, match="aligned"):
            load(off)
        with pytest.raises(ValueError, match="aligned"):
            store(off, 0)
    assert snapshot(target.buf) == before


def test_store_rejects_bad_values(target: Target, view: AtomicView) -> None:
    before = snapshot(target.buf)
    off2 = next(o for o in range(8) if target.aligned(o, 2))
    off4 = next(o for o in range(8) if target.aligned(o, 4))
    for value in [-1, 0x1_0000, 2**64, -(2**64)]:
        with pytest.raises(ValueError, match="u16 value"):
            view.store_u16(off2, value)
    for value in [-1, 2**32, 2**64 + 1]:
        with pytest.raises(ValueError, match="u32 value"):
            view.store_u32(off4, value)
    for mask in [-1, 256, 2**64]:
        with pytest.raises(ValueError, match="mask"):
            view.or_u8(0, mask)
    assert snapshot(target.buf) == before
    view.store_u16(off2, 0xFFFF)
    view.store_u32(off4 + 4, 0xFFFF_FFFF)
    assert view.load_u16(off2) == 0xFFFF
    assert view.load_u32(off4 + 4) == 0xFFFF_FFFF


def test_non_integers_rejected(view: AtomicView) -> None:
    with pytest.raises(TypeError):
        view.load_u8(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        view.read(0, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        view.or_u8(0, 1.5)  # type: ignore[arg-type]


# Each (offset, length) outside [0, SIZE), for the copy methods.
COPY_REJECTS = [
    (-1, 1),
    (-1, 0),
    (0, -1),
    (5, -1),
    (0, SIZE + 1),
    (1, SIZE),
    (SIZE, 1),
    (SIZE + 1, 0),
    (SIZE - 1, 2),
    (1, 2**64 - 1),  # wraps to offset + length == 0 in 64-bit arithmetic
    (2**64 - 1, 1),
    (2**64, 0),
    (2**63, 2**63),
    (-(2**64) + 1, 2),
]


@pytest.mark.parametrize(("off", "n"), COPY_REJECTS)
def test_read_rejects_out_of_range(view: AtomicView, off: int, n: int) -> None:
    with pytest.raises(IndexError):
        view.read(off, n)


@pytest.mark.parametrize(("off", "n"), [x for x in COPY_REJECTS if 0 <= x[1] < 2**20])
def test_read_into_and_write_reject_out_of_range(
    target: Target, view: AtomicView, off: int, n: int
) -> None:
    before = snapshot(target.buf)
    out = bytearray(b"\x5a" * n)
    with pytest.raises(IndexError):
        view.read_into(off, out)
    assert out == b"\x5a" * n
    with pytest.raises(IndexError):
        view.write(off, b"\xa5" * n)
    assert snapshot(target.buf) == before


# ---------------------------------------------------------------- buffers accepted


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"read-only bytes",
        lambda: memoryview(b"read-only view"),
        lambda: memoryview(bytearray(64)).toreadonly(),
        lambda: bytes(64),
    ],
)
def test_view_rejects_read_only(make: Callable[[], Buffer]) -> None:
    with pytest.raises(TypeError, match="writable"):
        AtomicView(make())


def test_view_rejects_read_only_mmap() -> None:
    with (
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ) as m,
        pytest.raises(TypeError, match="writable"),
    ):
        AtomicView(m)
    # A failed pin leaves nothing pinned: the mmap closed above.
    assert m.closed


def test_view_rejects_non_contiguous_and_non_buffers() -> None:
    with pytest.raises(TypeError, match="contiguous"):
        AtomicView(memoryview(bytearray(64))[::2])
    with pytest.raises(TypeError):
        AtomicView("not a buffer")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AtomicView(None)  # type: ignore[arg-type]


def test_read_into_rejects_read_only_out(view: AtomicView) -> None:
    with pytest.raises(TypeError, match="writable"):
        view.read_into(0, b"1234")


def test_empty_view() -> None:
    with AtomicView(bytearray()) as v:
        assert v.size == 0
        assert v.read(0, 0) == b""
        v.write(0, b"")
        with pytest.raises(IndexError):
            v.load_u8(0)
        with pytest.raises(IndexError):
            v.load_u16(0)
        with pytest.raises(IndexError):
            v.read(0, 1)


def test_view_pins_bytearray_against_resize() -> None:
    buf = bytearray(16)
    v = AtomicView(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")
    v.release()
    buf.extend(b"x")
    assert len(buf) == 17


# ---------------------------------------------------------------- release


def test_release_refuses_every_method(target: Target) -> None:
    v = AtomicView(target.buf)
    v.release()
    calls: list[Callable[[], object]] = [
        lambda: v.size,
        lambda: v.load_u8(0),
        lambda: v.load_u16(0),
        lambda: v.load_u32(0),
        lambda: v.store_u16(0, 1),
        lambda: v.store_u32(0, 1),
        lambda: v.or_u8(0, 1),
        lambda: v.read(0, 0),
        lambda: v.read(0, 1),
        lambda: v.read_into(0, bytearray(1)),
        lambda: v.read_into(0, bytearray()),
        lambda: v.write(0, b"x"),
        lambda: v.write(0, b""),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="view released"):
            call()
    v.release()  # idempotent
    assert "released" in repr(v)


def test_context_manager_releases() -> None:
    buf = bytearray(8)
    with AtomicView(buf) as v:
        assert v.or_u8(0, 1) == 0
    with pytest.raises(ValueError, match="view released"):
        v.load_u8(0)


def test_mmap_closes_only_once_the_view_is_released() -> None:
    m = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    v = AtomicView(m)
    v.store_u32(4, 7)
    with pytest.raises(BufferError):
        m.close()
    assert not is_closed(m)
    v.release()
    m.close()
    assert is_closed(m)
    with pytest.raises(ValueError, match="view released"):
        v.load_u32(4)


def test_mmap_closes_after_context_manager() -> None:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    with AtomicView(m) as v:
        v.write(0, b"abc")
    m.close()
    assert m.closed


def test_two_views_of_one_mmap_pin_independently() -> None:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    a = AtomicView(m)
    b = AtomicView(m)
    a.store_u16(0, 0xBEEF)
    assert b.load_u16(0) == 0xBEEF
    a.release()
    with pytest.raises(BufferError):
        m.close()
    b.release()
    m.close()


def test_shared_mapping_sees_stores() -> None:
    # Two MAP_SHARED mappings of one memfd stand for us and the frontend.
    fd = os.memfd_create("vubackend-test")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        ours = mmap.mmap(fd, mmap.PAGESIZE)
        theirs = mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    with AtomicView(ours) as v:
        v.store_u16(2, 0x0102)
        v.store_u32(8, 0x03040506)
        v.or_u8(100, 0x81)
        assert theirs[2:4] == struct.pack("=H", 0x0102)
        assert theirs[8:12] == struct.pack("=I", 0x03040506)
        assert theirs[100] == 0x81
        theirs[200:204] = b"peer"
        assert v.read(200, 4) == b"peer"
    ours.close()
    theirs.close()


# ---------------------------------------------------------------- copy()


def test_copy_between_buffers() -> None:
    src = bytes(range(256))
    dst = bytearray(300)
    copy(dst, 10, src, 5, 100)
    assert dst == bytes(10) + src[5:105] + bytes(190)
    copy(dst, 0, src, 0, 0)
    copy(dst, 300, src, 256, 0)
    with mmap.mmap(-1, 4096) as m:
        copy(m, 4000, src, 0, 96)
        assert m[4000:4096] == src[:96]
        copy(dst, 0, m, 4000, 96)
        assert dst[:96] == src[:96]
    assert m.closed  # the copy pinned it only during the call


def test_copy_overlapping_within_one_buffer() -> None:
    buf = bytearray(range(100))
    copy(buf, 10, buf, 0, 50)  # forward overlap
    assert buf == bytes(range(10)) + bytes(range(50)) + bytes(range(60, 100))
    buf = bytearray(range(100))
    copy(buf, 0, buf, 10, 50)  # backward overlap
    assert buf == bytes(range(10, 60)) + bytes(range(50, 100))


@pytest.mark.parametrize(
    ("dst_off", "src_off", "n"),
    [
        (-1, 0, 1),
        (0, -1, 1),
        (0, 0, -1),
        (0, 0, 65),
        (1, 0, 64),
        (0, 1, 64),
        (64, 0, 1),
        (0, 64, 1),
        (65, 0, 0),
        (0, 65, 0),
        (1, 0, 2**64 - 1),
        (0, 1, 2**64 - 1),
        (2**64, 0, 0),
        (0, 2**64 - 1, 2),
    ],
)
def test_copy_rejects_out_of_range(dst_off: int, src_off: int, n: int) -> None:
    with mmap.mmap(-1, 64) as dm:
        src = bytes(range(64))
        dst = memoryview(dm)
        dm[:] = b"\x77" * 64
        with pytest.raises(IndexError):
            copy(dst, dst_off, src, src_off, n)
        assert dm[:] == b"\x77" * 64
        dst.release()
    # Pins taken by the failed call are gone.
    assert dm.closed


def test_copy_rejects_read_only_destination() -> None:
    with pytest.raises(TypeError, match="writable"):
        copy(b"immutable", 0, b"x", 0, 1)
    with pytest.raises(TypeError, match="contiguous"):
        copy(bytearray(8), 0, memoryview(bytes(8))[::2], 0, 1)


# ---------------------------------------------------------------- random model


@dataclass(frozen=True)
class Op:
    """One call on an AtomicView: ``name(offset, arg)``; ``arg`` is the value,
    mask, length (read) or data (write), unused for loads."""

    name: str
    offset: int
    arg: int | bytes = 0


def _ops() -> st.SearchStrategy[Op]:
    offsets = st.integers(-3, 67)
    return st.one_of(
        st.builds(Op, st.sampled_from(["load_u8", "load_u16", "load_u32"]), offsets),
        st.builds(Op, st.just("store_u16"), offsets, st.integers(-2, 0x10001)),
        st.builds(Op, st.just("store_u32"), offsets, st.integers(-2, 2**32 + 1)),
        st.builds(Op, st.just("or_u8"), offsets, st.integers(-2, 257)),
        st.builds(Op, st.just("read"), offsets, st.integers(-3, 70)),
        st.builds(Op, st.just("write"), offsets, st.binary(max_size=70)),
    )


_WIDTH = {"load_u8": 1, "or_u8": 1, "load_u16": 2, "store_u16": 2}
_FMT = {1: "=B", 2: "=H", 4: "=I"}


def _model(model: bytearray, addr: int, op: Op) -> type[Exception] | object:
    """What ``op`` does to the model; returns its result or the exception type
    it must raise."""
    off, size = op.offset, len(model)
    if op.name in ("read", "write"):
        n = op.arg if isinstance(op.arg, int) else len(op.arg)
        if n < 0 or off < 0 or off + n > size:
            return IndexError
        if isinstance(op.arg, bytes):
            model[off : off + n] = op.arg
            return None
        return bytes(model[off : off + n])
    width = _WIDTH.get(op.name, 4)
    if off < 0 or off + width > size:
        return IndexError
    if (addr + off) % width:
        return ValueError
    old: int = struct.unpack_from(_FMT[width], model, off)[0]
    if op.name.startswith("load"):
        return old
    assert isinstance(op.arg, int)
    if not 0 <= op.arg < 1 << (8 * width):
        return ValueError
    if op.name == "or_u8":
        model[off] |= op.arg
        return old
    struct.pack_into(_FMT[width], model, off, op.arg)
    return None


def _apply(v: AtomicView, op: Op) -> object:
    arg = op.arg
    if op.name == "load_u8":
        return v.load_u8(op.offset)
    if op.name == "load_u16":
        return v.load_u16(op.offset)
    if op.name == "load_u32":
        return v.load_u32(op.offset)
    if op.name == "write":
        assert isinstance(arg, bytes)
        v.write(op.offset, arg)
        return None
    assert isinstance(arg, int)
    if op.name == "store_u16":
        v.store_u16(op.offset, arg)
        return None
    if op.name == "store_u32":
        v.store_u32(op.offset, arg)
        return None
    if op.name == "or_u8":
        return v.or_u8(op.offset, arg)
    assert op.name == "read"
    return v.read(op.offset, arg)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(_ops(), max_size=40),
    start=st.integers(0, 7),
    seed=st.binary(min_size=64, max_size=64),
)
def test_random_ops_match_model(ops: list[Op], start: int, seed: bytes) -> None:
    backing = bytearray(72)
    with memoryview(backing)[start : start + 64] as buf:
        buf[:] = seed
        model = bytearray(seed)
        addr = address(buf)
        with AtomicView(buf) as v:
            for op in ops:
                expected = _model(model, addr, op)
                if isinstance(expected, type) and issubclass(expected, Exception):
                    with pytest.raises(expected):
                        _apply(v, op)
                else:
                    assert _apply(v, op) == expected
                assert bytes(buf) == bytes(model)
