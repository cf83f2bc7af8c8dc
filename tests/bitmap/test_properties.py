"""Property tests: DirtyLog and RegionBitmap against a plain Python model of
the log (a set of page numbers and a drop counter)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vubackend.bitmap import DirtyLog, DirtyLogSlot, RegionBitmap

from .test_log import set_pages

PAGE = 4096

# Marks near the log's end are the interesting ones: keep addresses within a
# few log lengths (the log covers size * 8 pages) and lengths within pages.
marks = st.lists(
    st.tuples(st.integers(0, 80 * PAGE * 8), st.integers(0, 20 * PAGE)),
    max_size=30,
)


def model(size: int, writes: list[tuple[int, int]]) -> tuple[set[int], int]:
    """Pages set and pages dropped, the obvious way."""
    pages: set[int] = set()
    dropped = 0
    for gpa, length in writes:
        if length == 0:
            continue
        for page in range(gpa // PAGE, (gpa + length - 1) // PAGE + 1):
            if page < size * 8:
                pages.add(page)
            else:
                dropped += 1
    return pages, dropped


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 64), writes=marks)
def test_log_matches_the_model(size: int, writes: list[tuple[int, int]]) -> None:
    buf = bytearray(size)
    log = DirtyLog(buf)
    for gpa, length in writes:
        log.mark_dirty(gpa, length)
    pages, dropped = model(size, writes)
    assert set_pages(buf) == pages
    assert log.dropped_pages == dropped
    for page in range(size * 8 + 2):
        assert log.dirty_at(page * PAGE + PAGE // 2) == (page in pages)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 64),
    base_page=st.integers(0, 600),
    writes=st.lists(
        st.tuples(st.integers(0, 64 * PAGE), st.integers(0, 8 * PAGE)), max_size=20
    ),
)
def test_region_view_is_the_log_shifted_by_its_base(
    size: int, base_page: int, writes: list[tuple[int, int]]
) -> None:
    buf = bytearray(size)
    base = base_page * PAGE + 0x123  # a region need not start on a page
    view = RegionBitmap(DirtyLogSlot(DirtyLog(buf)), base)
    for offset, length in writes:
        view.mark_dirty(offset, length)
    pages, _ = model(size, [(base + offset, length) for offset, length in writes])
    assert set_pages(buf) == pages
