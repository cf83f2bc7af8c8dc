"""The pytest plugin of vubackend.frontend.testing, used as a user would:
against qemu-storage-daemon, in a few lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vubackend.frontend import BlkDriver, Frontend
from vubackend.frontend.testing import FrontendFactory
from vubackend.frontend.testing import vhost_user_frontend as _plugin_fixture
from vubackend.protocol import VirtioFeatures

from .peers import StorageDaemon, storage_daemon

# What `pytest_plugins = ["vubackend.frontend.testing"]` does in a root
# conftest.py: make the plugin's fixture visible here.
vhost_user_frontend = _plugin_fixture


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[StorageDaemon]:
    with storage_daemon(tmp_path, size_mb=4, num_queues=1) as daemon:
        yield daemon


def test_factory_connects_and_cleans_up(
    vhost_user_frontend: FrontendFactory, qsd: StorageDaemon
) -> None:
    fe = vhost_user_frontend(qsd.socket)
    fe.handshake(int(VirtioFeatures.VERSION_1))
    fe.create_memory([4 << 20])
    blk = BlkDriver(fe, fe.setup_queue(0, 32))
    blk.write(0, b"x" * 512)
    assert blk.read(0) == b"x" * 512
    assert isinstance(fe, Frontend)
