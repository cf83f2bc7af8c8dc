"""Fixtures: a daemon serving a RamDisk on a socket, in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserBackend, VhostUserDaemon
from vubackend.frontend import Frontend

from ._device import RamDisk


@dataclass
class Served:
    daemon: VhostUserDaemon
    device: RamDisk
    path: Path
    thread: threading.Thread
    errors: list[BaseException]

    def connect(self) -> Frontend:
        return Frontend.connect(self.path, retry_for=5.0, timeout=5.0)


ServeFactory = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """``serve(device=None, **daemon_kwargs)``: a daemon serving ``device``
    (a fresh RamDisk by default) with reconnect; shut down after the test,
    which then checks that no fd leaked."""
    before = open_fds()
    made: list[Served] = []

    def factory(device: VhostUserBackend | None = None) -> Served:
        dev = device if device is not None else RamDisk()
        assert isinstance(dev, RamDisk)
        path = tmp_path / f"daemon{len(made)}.sock"
        daemon = VhostUserDaemon("test-blk", dev)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                daemon.serve(path)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        served = Served(daemon, dev, path, thread, errors)
        made.append(served)
        return served

    yield factory
    for served in made:
        served.daemon.close()
        served.thread.join(timeout=10)
        assert not served.thread.is_alive(), "serve() did not return after close()"
        assert served.errors == []
        assert served.daemon.worker_errors == []
    assert open_fds() == before, "the daemon leaked file descriptors"
