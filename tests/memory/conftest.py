"""Fixtures of the memory tests."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator

import pytest

from ._support import MEMFD_NAME

MakeMemfd = Callable[..., int]


@pytest.fixture(autouse=True)
def _collect_garbage_first() -> None:
    """Collect what earlier tests left in reference cycles (an exception's
    traceback can hold memoryviews of a mapping, which keeps it mapped), so
    that counts of fds and mappings taken by a test start from a settled
    process. Nothing is collected during the test itself."""
    gc.collect()


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """A 100 µs GIL switch interval instead of 5 ms, for tests whose threads
    must interleave often: otherwise each system call of the thread that
    swaps tables waits out a reader's whole 5 ms slice to get the GIL back."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def make_memfd() -> Iterator[MakeMemfd]:
    """Make a memfd of ``size`` bytes (optionally filled with ``content`` at
    offset 0), closed after the test: the frontend's side of guest memory."""
    made: list[int] = []

    def make(size: int, content: bytes = b"", name: str = MEMFD_NAME) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        made.append(fd)
        os.ftruncate(fd, size)
        if content:
            os.pwrite(fd, content, 0)
        return fd

    yield make
    for fd in made:
        os.close(fd)
