"""SharedMapping: the checked MAP_SHARED mapping of a range of a frontend's fd."""

from __future__ import annotations

import gc
import mmap
import os

import pytest

from vubackend.bitmap import U64_LIMIT, SharedMapping, fd_page_size
from vubackend.errors import MappingError

from ._support import count_fds, count_mappings
from .conftest import MakeMemfd

PAGE = mmap.PAGESIZE


def test_maps_an_unaligned_range_exactly(make_memfd: MakeMemfd) -> None:
    content = bytes(range(256)) * 48  # 3 pages
    fd = make_memfd(len(content), content)
    mapping = SharedMapping.map(fd, offset=PAGE + 100, size=300, what="test")
    try:
        assert mapping.size == 300
        assert mapping.view.tobytes() == content[PAGE + 100 : PAGE + 400]
        # Shared: a write through the mapping is what the frontend reads.
        mapping.view[0:4] = b"\xde\xad\xbe\xef"
        assert os.pread(fd, 4, PAGE + 100) == b"\xde\xad\xbe\xef"
        # And a write by the frontend shows up in the mapping.
        os.pwrite(fd, b"xyz", PAGE + 110)
        assert mapping.view[10:13].tobytes() == b"xyz"
    finally:
        assert mapping.close()


def test_borrows_the_fd_and_gives_everything_back(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(4 * PAGE)
    fds, maps = count_fds(), count_mappings()
    mapping = SharedMapping.map(fd, offset=0, size=4 * PAGE, what="test")
    # Python's mmap keeps its own duplicate of the fd while mapped.
    assert count_fds() == fds + 1
    assert count_mappings() == maps + 1
    assert mapping.close()
    assert mapping.closed
    assert count_fds() == fds
    assert count_mappings() == maps
    os.fstat(fd)  # ours is still open: the mapping only borrowed it
    assert mapping.close()  # idempotent


@pytest.mark.parametrize(
    ("offset", "size", "words"),
    [
        (0, 0, "must be > 0"),
        (0, -1, "must be > 0"),
        (0, U64_LIMIT, "must be > 0"),
        (-1, 4096, "fit in a u64"),
        (U64_LIMIT, 4096, "fit in a u64"),
        (U64_LIMIT - 4096, 8192, "overflows a u64"),
        (4 * PAGE - 1, 2, "past the end of its file"),
        (0, 4 * PAGE + 1, "past the end of its file"),
    ],
)
def test_rejects_bad_ranges(
    make_memfd: MakeMemfd, offset: int, size: int, words: str
) -> None:
    fd = make_memfd(4 * PAGE)
    maps = count_mappings()
    with pytest.raises(MappingError, match=words):
        SharedMapping.map(fd, offset=offset, size=size, what="test range")
    assert count_mappings() == maps


def test_accepts_a_range_ending_at_the_end_of_the_file(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(2 * PAGE)
    mapping = SharedMapping.map(fd, offset=2 * PAGE - 1, size=1, what="test")
    assert mapping.size == 1
    mapping.close()


def test_a_closed_fd_is_a_mapping_error_from_the_oserror(
    make_memfd: MakeMemfd,
) -> None:
    fd = os.dup(make_memfd(PAGE))
    os.close(fd)
    with pytest.raises(MappingError, match="cannot fstat") as info:
        SharedMapping.map(fd, offset=0, size=PAGE, what="test")
    assert isinstance(info.value.__cause__, OSError)


def test_close_defers_unmapping_while_a_python_view_is_alive(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(PAGE)
    fds, maps = count_fds(), count_mappings()
    mapping = SharedMapping.map(fd, offset=0, size=PAGE, what="test")
    leaked = mapping.view[8:16]
    assert not mapping.close()  # refused: `leaked` still points into it
    assert count_mappings() == maps + 1
    leaked[0] = 1  # still valid memory, not a crash
    del leaked
    gc.collect()
    assert count_mappings() == maps
    assert count_fds() == fds
    with pytest.raises(ValueError, match="closed"):
        _ = mapping.view


def test_page_size_of_a_memfd_is_the_host_page_size(make_memfd: MakeMemfd) -> None:
    assert fd_page_size(make_memfd(PAGE)) == mmap.PAGESIZE


def test_huge_page_alignment_maps_whole_pages_and_slices(
    make_memfd: MakeMemfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hugetlbfs path, on a memfd that pretends to have 16-page pages:
    the offset is aligned down to a whole "huge page", the length rounded up
    to whole ones, and the view is still exactly the requested range."""
    huge = 16 * PAGE
    content = os.urandom(4 * huge)
    fd = make_memfd(len(content), content)
    monkeypatch.setattr("vubackend.bitmap._mapping.fd_page_size", lambda fd: huge)
    before = _memfd_spans()
    mapping = SharedMapping.map(fd, offset=huge + 5, size=3 * PAGE, what="test")
    try:
        assert mapping.page_size == huge
        assert mapping.view.tobytes() == content[huge + 5 : huge + 5 + 3 * PAGE]
        ((start, end),) = _memfd_spans() - before
        assert end - start == huge  # one whole "huge page", not 3 pages and a bit
    finally:
        mapping.close()


def _memfd_spans() -> set[tuple[int, int]]:
    spans = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/memfd:vubackend-test-bitmap " in line:
                start, end = line.split()[0].split("-")
                spans.add((int(start, 16), int(end, 16)))
    return spans
