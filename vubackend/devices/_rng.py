# virtio-rng (virtio 1.x §5.4): one request queue of device-writable
# buffers, filled from the kernel's random source.
#
# Rules: built only on the public daemon API; a request is capped so that one
# guest cannot make the worker read unbounded amounts of entropy at once.

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final, final

from vubackend.daemon import VhostUserBackend
from vubackend.protocol import ProtocolFeatures, VirtioFeatures
from vubackend.vring import DescriptorChain, VringT

__all__ = ["RngDevice"]

# Bytes served per request at most (QEMU's rng-random backend reads in
# chunks too); the guest asks again for more.
MAX_REQUEST: Final = 64 * 1024


@final
class RngDevice(VhostUserBackend):
    """virtio-rng, filled from the kernel's random source.

    Args:
        source: ``source(n)`` returns n random bytes; ``os.urandom`` (the
            kernel's getrandom) by default.
    """

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self._read = source
        self.bytes_served = 0

    def num_queues(self) -> int:
        return 1

    def max_queue_size(self) -> int:
        return 1024

    def features(self) -> int:
        return int(
            VirtioFeatures.VERSION_1
            | VirtioFeatures.PROTOCOL_FEATURES
            | VirtioFeatures.EVENT_IDX
            | VirtioFeatures.INDIRECT_DESC
            | VirtioFeatures.RING_PACKED
        )

    def protocol_features(self) -> ProtocolFeatures:
        return ProtocolFeatures.MQ

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        # The ring's drain: serve, complete and signal per batch until empty.
        vrings[device_event].drain(self._serve)

    def _serve(self, chain: DescriptorChain) -> int:
        written = chain.write(self._read(min(chain.writable_len, MAX_REQUEST)))
        self.bytes_served += written
        return written
