"""pytest fixtures to test your own vhost-user backend with the Python
frontend, in a few lines.

Use them by naming this module as a plugin in your ``conftest.py``::

    pytest_plugins = ["vubackend.frontend.testing"]

    def test_my_blk_backend(vhost_user_frontend, my_backend_socket):
        fe = vhost_user_frontend(my_backend_socket)  # closed after the test
        fe.handshake(VirtioFeatures.VERSION_1)
        fe.create_memory([16 << 20])
        blk = BlkDriver(fe, fe.setup_queue(0, 128))
        blk.write(0, b"x" * 512); assert blk.read(0) == b"x" * 512

Fixtures:

* ``vhost_user_frontend``: a factory ``(path, *, timeout=5.0, retry_for=5.0)
  -> Frontend`` that connects to a listening backend (client role); every
  frontend it made is closed after the test, also when the test fails.
* ``vhost_user_listening_frontend``: a factory ``(path, *, accept_timeout=10.0)
  -> Frontend`` for backends that connect (server role), same teardown.
* ``vhost_user_socket_path``: a fresh socket path in the test's temp dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vubackend.frontend._engine import DEFAULT_TIMEOUT
from vubackend.frontend._frontend import Frontend

__all__ = [
    "FrontendFactory",
    "vhost_user_frontend",
    "vhost_user_listening_frontend",
    "vhost_user_socket_path",
]

FrontendFactory = Callable[..., Frontend]
"""The type of the factory fixtures: call with a socket path."""


@pytest.fixture
def vhost_user_socket_path(tmp_path: Path) -> Path:
    """A socket path in the test's own temporary directory."""
    return tmp_path / "vhost-user.sock"


@pytest.fixture
def vhost_user_frontend() -> Iterator[FrontendFactory]:
    """Connect frontends to listening backends; close them after the test.

    Yields:
        ``factory(path, *, timeout=5.0, retry_for=5.0) -> Frontend``.
    """
    made: list[Frontend] = []

    def factory(
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = 5.0,
    ) -> Frontend:
        frontend = Frontend.connect(path, timeout=timeout, retry_for=retry_for)
        made.append(frontend)
        return frontend

    try:
        yield factory
    finally:
        for frontend in reversed(made):
            frontend.close()


@pytest.fixture
def vhost_user_listening_frontend() -> Iterator[FrontendFactory]:
    """Wait for backends that connect (server role); close the frontends
    after the test.

    Yields:
        ``factory(path, *, timeout=5.0, accept_timeout=10.0) -> Frontend``.
    """
    made: list[Frontend] = []

    def factory(
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        accept_timeout: float = 10.0,
    ) -> Frontend:
        frontend = Frontend.listen(path, timeout=timeout, accept_timeout=accept_timeout)
        made.append(frontend)
        return frontend

    try:
        yield factory
    finally:
        for frontend in reversed(made):
            frontend.close()
