"""Fixtures of the frontend tests: a frontend wired to the fake backend."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from vubackend.frontend import Frontend

from ._fake_backend import FakeBackend, running_backend


@pytest.fixture
def backend() -> FakeBackend:
    """The fake backend's behaviour (tweak it before using ``frontend``)."""
    return FakeBackend()


@pytest.fixture
def frontend(backend: FakeBackend) -> Iterator[Frontend]:
    """A frontend connected to the fake backend, closed after the test."""
    gc.collect()
    with running_backend(backend) as sock:
        fe = Frontend.from_socket(sock, timeout=2.0)
        try:
            yield fe
        finally:
            fe.close()
