"""Property tests: GuestMemory translation against a plain Python model of the
memory table (a list of (gpa, size, file offset, frontend address))."""

from __future__ import annotations

import gc
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vubackend.errors import UnmappedAddressError
from vubackend.memory import FrontendAddress, GuestAddress, GuestMemory

from ._support import MEMFD_NAME, count_mappings, descriptor

FILE_SIZE = 0x20000

Row = tuple[int, int, int, int]  # gpa, size, file offset, frontend address


@st.composite
def tables(draw: st.DrawFn) -> list[Row]:
    """Up to 5 regions: GPAs increasing with gaps of 0 (adjacent) or more,
    sizes and file offsets at any byte alignment, frontend addresses
    disjoint but in an order of their own."""
    count = draw(st.integers(1, 5))
    rows: list[Row] = []
    gpa = draw(st.integers(0, 0x3000))
    offset = 0
    for _ in range(count):
        size = draw(st.integers(1, 0x3000))
        offset += draw(st.integers(0, 0x1200))
        rows.append((gpa, size, offset, 0))
        offset += size
        gpa += size + draw(st.sampled_from([0, 0, 1, draw(st.integers(1, 0x4000))]))
    order = draw(st.permutations(range(count)))
    faddr = 0x7F00_0000_0000
    placed = list(rows)
    for index in order:
        gpa, size, offset, _ = rows[index]
        placed[index] = (gpa, size, offset, faddr)
        faddr += size + draw(st.integers(0, 0x100))
    return placed


def covering(rows: list[Row], gpa: int, length: int) -> list[tuple[int, int]] | None:
    """(file offset, count) pieces of [gpa, gpa + length), one per region
    crossed, or None if some byte is unmapped: a linear walk over the rows."""
    pieces: list[tuple[int, int]] = []
    address, end = gpa, gpa + length
    while address < end:
        for start, size, offset, _ in rows:
            if start <= address < start + size:
                count = min(start + size, end) - address
                pieces.append((offset + address - start, count))
                address += count
                break
        else:
            return None
    return pieces


@settings(max_examples=60, deadline=None)
@given(
    rows=tables(),
    queries=st.lists(
        st.tuples(st.integers(-2, 0x16000), st.integers(0, 0x5000)), max_size=8
    ),
    data=st.data(),
)
def test_translate_matches_the_model(
    rows: list[Row], queries: list[tuple[int, int]], data: st.DataObject
) -> None:
    content = os.urandom(FILE_SIZE)
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    gc.collect()  # what earlier examples left in cycles
    maps = count_mappings()
    try:
        os.pwrite(fd, content, 0)
        shuffled = data.draw(st.permutations(rows))
        mem = GuestMemory.map(
            [
                descriptor(fd, gpa, size, frontend_addr=faddr, mmap_offset=offset)
                for gpa, size, offset, faddr in shuffled
            ]
        )
        views: list[memoryview] = []
        try:
            # Queries near region edges find the interesting cases.
            edges = [
                (gpa + size + d, n)
                for gpa, size, _, _ in rows
                for d, n in ((-2, 4), (-1, 1), (0, 1))
            ]
            for gpa, length in queries + edges:
                expected = covering(rows, gpa, length)
                if expected is None:
                    with pytest.raises(UnmappedAddressError) as info:
                        mem.translate(GuestAddress(gpa), length)
                    assert (info.value.address, info.value.length) == (gpa, length)
                    continue
                views = mem.translate(GuestAddress(gpa), length)
                assert [v.nbytes for v in views] == [n for _, n in expected]
                assert b"".join(v.tobytes() for v in views) == b"".join(
                    content[o : o + n] for o, n in expected
                )
                assert mem.read(GuestAddress(gpa), length) == b"".join(
                    v.tobytes() for v in views
                )
            for gpa, size, _, faddr in rows:
                offset = data.draw(st.integers(0, size - 1))
                length = data.draw(st.integers(0, size + 1))
                if offset + length <= size:
                    got = mem.faddr_to_gpa(FrontendAddress(faddr + offset), length)
                    assert got == gpa + offset
                else:
                    with pytest.raises(UnmappedAddressError):
                        mem.faddr_to_gpa(FrontendAddress(faddr + offset), length)
            del views  # or close() rightly leaves their mapping to the GC
        finally:
            mem.close()
        assert count_mappings() == maps
    finally:
        os.close(fd)
