"""Fixtures of the bitmap tests."""

from __future__ import annotations

import gc
import os
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
def make_memfd() -> Iterator[MakeMemfd]:
    """Make a memfd of ``size`` bytes (optionally filled with ``content`` at
    offset 0), closed after the test: the frontend's side of a dirty log."""
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
