"""No lost kicks: a kick that arrives while a ring is disabled
(SET_VRING_ENABLE 0) is served once the ring is enabled again, without
another kick."""

from __future__ import annotations

import time

import pytest

from vubackend.frontend import BlkRequestType

from ._device import BLK_S_OK, SECTOR
from .conftest import ServeFactory
from .test_daemon import start


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_kick_while_disabled_is_served_on_enable(
    serve: ServeFactory, packed: bool
) -> None:
    served = serve()
    with served.connect() as fe:
        [blk] = start(fe, packed=packed, queues=1)
        blk.write(0, b"Z" * SECTOR)  # the ring works
        queue = blk.queue
        fe.set_vring_enable(0, False)
        request = blk.submit(BlkRequestType.OUT, 1, data=b"A" * SECTOR, kick=False)
        fe.kick(queue)  # written to the kick eventfd while disabled
        time.sleep(0.2)
        assert not request.done
        assert served.device.disk[SECTOR : 2 * SECTOR] == bytes(SECTOR)
        fe.set_vring_enable(0, True)  # no kick after this
        blk.wait([request], timeout=5)
        assert request.status == BLK_S_OK
        assert served.device.disk[SECTOR : 2 * SECTOR] == b"A" * SECTOR
