"""Fixtures of the vring tests."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Protocol

import pytest

from vubackend.memory import GuestMemoryAtomic

from ._support import Harness, make_memory, new_memfd


class MakeHarness(Protocol):
    def __call__(
        self,
        *,
        packed: bool,
        native: bool,
        size: int = 16,
        event_idx: bool = False,
        indirect: bool = True,
        in_order: bool = False,
        vring_base: int | None = None,
    ) -> Harness: ...


@pytest.fixture(autouse=True)
def _collect_garbage_first() -> None:
    """Settle what earlier tests left in reference cycles (see tests/memory)."""
    gc.collect()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = new_memfd()
    yield fd
    os.close(fd)


@pytest.fixture
def atomic(memfd: int) -> Iterator[GuestMemoryAtomic]:
    mem = make_memory(memfd)
    yield mem
    mem.close()


@pytest.fixture
def harness(atomic: GuestMemoryAtomic) -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(
        *,
        packed: bool,
        native: bool,
        size: int = 16,
        event_idx: bool = False,
        indirect: bool = True,
        in_order: bool = False,
        vring_base: int | None = None,
    ) -> Harness:
        h = Harness(
            atomic,
            packed=packed,
            native=native,
            size=size,
            event_idx=event_idx,
            indirect=indirect,
            in_order=in_order,
            vring_base=vring_base,
        )
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value
