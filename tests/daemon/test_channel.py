"""The backend channel from a device's side: shared objects reach the
front-end's table and come back on lookup, a request the front-end refuses
raises, and a request whose feature was not negotiated is refused before
anything is sent."""

from __future__ import annotations

import os
import uuid

import pytest

from vubackend.errors import LocalProtocolError
from vubackend.protocol import ProtocolFeatures

from ._device import RamDisk
from .conftest import ServeFactory
from .test_daemon import start

UUID = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")


class SharingDisk(RamDisk):
    def protocol_features(self) -> ProtocolFeatures:
        return super().protocol_features() | ProtocolFeatures.SHARED_OBJECT


def test_shared_objects_over_the_backend_channel(serve: ServeFactory) -> None:
    served = serve(SharingDisk())
    with served.connect() as fe:
        start(fe)
        assert fe.has_protocol_feature(ProtocolFeatures.SHARED_OBJECT)
        channel = served.device.channel
        assert channel is not None
        assert channel.reply_ack
        frontend_side = fe.backend_channel
        assert frontend_side is not None

        channel.shared_object_add(UUID.bytes)
        assert UUID in frontend_side.shared_objects
        # Known but without a dma-buf: the lookup answers "none".
        assert channel.shared_object_lookup(UUID.bytes) is None
        read_end, write_end = os.pipe()
        try:
            frontend_side.shared_objects[UUID] = read_end
            fd = channel.shared_object_lookup(UUID.bytes)
            assert fd is not None
            assert os.fstat(fd).st_ino == os.fstat(read_end).st_ino
            os.close(fd)
        finally:
            frontend_side.shared_objects[UUID] = None
            os.close(read_end)
            os.close(write_end)
        channel.shared_object_remove(UUID.bytes)
        assert UUID not in frontend_side.shared_objects


def test_requests_without_their_feature_are_refused_locally(
    serve: ServeFactory,
) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        channel = served.device.channel
        assert channel is not None
        with pytest.raises(LocalProtocolError, match="INBAND_NOTIFICATIONS"):
            channel.vring_call(0)
        with pytest.raises(LocalProtocolError, match="SHARED_OBJECT"):
            channel.shared_object_add(UUID.bytes)
        channel.config_change()  # CONFIG is negotiated: this one goes out
