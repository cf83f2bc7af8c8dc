# What a device implements: the VhostUserBackend API of the seed
# (rust-vmm vhost-user-backend backend.rs), in Python.
#
# Rules:
# * Hooks the seed requires are abstract here; every other hook has a
#   default that either does nothing or refuses the request with
#   UnsupportedRequestError (the daemon then answers the request with a
#   failure and logs why, and the session goes on).
# * Hooks are called from the request thread, except handle_event (worker
#   threads) and queue_started (the request thread, right after a ring
#   starts). A VhostUserBackend must therefore be thread-safe itself; a
#   VhostUserBackendMut is serialised by the daemon (one lock around every
#   hook), like the seed's Mutex<T> blanket implementation.

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, final

from vubackend.errors import UnsupportedRequestError
from vubackend.protocol import DeviceStateDirection, DeviceStatePhase, ProtocolFeatures

if TYPE_CHECKING:
    from vubackend.daemon._channel import BackendChannel
    from vubackend.memory import GuestMemoryAtomic
    from vubackend.vring import VringT

__all__ = ["VhostUserBackend", "VhostUserBackendMut", "serialized"]

# One worker thread for queues 0..63 unless the device asks otherwise.
ALL_QUEUES_MASK = (1 << 64) - 1


class VhostUserBackend(abc.ABC):
    """The device side of a vhost-user daemon. Subclass it and implement at
    least the abstract methods. Thread-safe devices subclass this class;
    devices that want every hook serialised subclass VhostUserBackendMut.
    """

    # -------------------------------------------------------------- required

    @abc.abstractmethod
    def num_queues(self) -> int:
        """How many virtqueues the device has (GET_QUEUE_NUM)."""

    @abc.abstractmethod
    def max_queue_size(self) -> int:
        """The largest ring size the device accepts (SET_VRING_NUM)."""

    @abc.abstractmethod
    def features(self) -> int:
        """The virtio features offered (GET_FEATURES). Include
        ``VirtioFeatures.PROTOCOL_FEATURES`` to speak the protocol features."""

    @abc.abstractmethod
    def protocol_features(self) -> ProtocolFeatures:
        """The protocol features offered. The daemon adds what it implements
        itself (REPLY_ACK, CONFIGURE_MEM_SLOTS, ...) and what the memory
        backend allows (XEN_MMAP, PAGEFAULT)."""

    @abc.abstractmethod
    def handle_event(
        self,
        device_event: int,
        evset: int,
        vrings: Sequence[VringT],
        thread_id: int,
    ) -> None:
        """Serve a kick or a custom listener's event, on worker ``thread_id``.

        Args:
            device_event: the index of the kicked ring within ``vrings`` (the
                worker's rings), or the token of a custom listener.
            evset: the epoll event mask (``select.EPOLLIN``, ...).
            vrings: the rings this worker serves, in queue order.
            thread_id: the worker's index in ``queues_per_thread()``.

        An exception is logged and stops this device's worker cleanly; the
        session and the process go on.
        """

    # -------------------------------------------------------------- optional

    def acked_features(self, features: int) -> None:
        """Called after SET_FEATURES with the features the front-end acked."""
        del features

    def set_event_idx(self, enabled: bool) -> None:
        """Called after SET_FEATURES: whether EVENT_IDX was negotiated."""
        del enabled

    def reset_device(self) -> None:
        """RESET_DEVICE: forget device state (rings are stopped for you)."""
        return

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes of config space from ``offset``.
        Return fewer bytes (e.g. b"") to refuse."""
        del offset, size
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the front-end writes config space. Raise DeviceError
        to refuse."""
        del offset, data
        raise UnsupportedRequestError("the device has no writable config space")

    def update_memory(self, memory: GuestMemoryAtomic) -> None:
        """Called after every change of the memory table."""
        del memory

    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        """SET_BACKEND_REQ_FD: the channel to send back-end requests on."""
        del channel

    def get_shared_object(self, uuid: bytes) -> int:
        """GET_SHARED_OBJECT: return a dma-buf fd for ``uuid`` (the daemon
        sends it and closes its copy)."""
        del uuid
        raise UnsupportedRequestError("the device exports no shared objects")

    def queues_per_thread(self) -> Sequence[int]:
        """One bit mask of queue indices per worker thread."""
        return [ALL_QUEUES_MASK]

    def exit_event(self, thread_index: int) -> int | None:
        """An eventfd a worker also watches: when it becomes readable the
        worker ends. None (the default) means the daemon's own exit event."""
        del thread_index
        return None

    def queue_started(self, index: int, vring: VringT) -> None:
        """Called on the request thread when ring ``index`` starts (kick fd
        set, enabled). Lets RX queues and rings restored from a saved base
        be served without waiting for a kick."""
        del index, vring

    def set_device_state_fd(
        self, direction: DeviceStateDirection, phase: DeviceStatePhase, fd: int
    ) -> int | None:
        """SET_DEVICE_STATE_FD: write (SAVE) or read (LOAD) the device state
        through ``fd``, which the device now owns and must close when done
        (EOF ends the stream). Must not block the request thread: do the
        transfer on a thread. Return an fd of your own to replace the
        front-end's, or None."""
        del direction, phase
        os.close(fd)
        raise UnsupportedRequestError("the device cannot migrate its state")

    def check_device_state(self) -> None:
        """CHECK_DEVICE_STATE: raise DeviceError if the last transfer failed."""
        raise UnsupportedRequestError("the device cannot migrate its state")

    def get_shmem_config(self) -> Sequence[int]:
        """GET_SHMEM_CONFIG: the size of each shared memory region."""
        raise UnsupportedRequestError("the device has no shared memory regions")


class VhostUserBackendMut(VhostUserBackend):
    """A device whose hooks the daemon calls one at a time, under a lock
    (the seed's ``VhostUserBackendMut`` behind a ``Mutex``). Simpler to
    write; a slow handle_event then delays every other hook."""


@final
class _Serialized(VhostUserBackend):
    """Wraps a VhostUserBackendMut: every hook runs under one lock."""

    def __init__(self, inner: VhostUserBackendMut) -> None:
        self.inner = inner
        self._lock = threading.RLock()

    def num_queues(self) -> int:
        with self._lock:
            return self.inner.num_queues()

    def max_queue_size(self) -> int:
        with self._lock:
            return self.inner.max_queue_size()

    def features(self) -> int:
        with self._lock:
            return self.inner.features()

    def protocol_features(self) -> ProtocolFeatures:
        with self._lock:
            return self.inner.protocol_features()

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        with self._lock:
            self.inner.handle_event(device_event, evset, vrings, thread_id)

    def acked_features(self, features: int) -> None:
        with self._lock:
            self.inner.acked_features(features)

    def set_event_idx(self, enabled: bool) -> None:
        with self._lock:
            self.inner.set_event_idx(enabled)

    def reset_device(self) -> None:
        with self._lock:
            self.inner.reset_device()

    def get_config(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.inner.get_config(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.inner.set_config(offset, data)

    def update_memory(self, memory: GuestMemoryAtomic) -> None:
        with self._lock:
            self.inner.update_memory(memory)

    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        with self._lock:
            self.inner.set_backend_req_fd(channel)

    def get_shared_object(self, uuid: bytes) -> int:
        with self._lock:
            return self.inner.get_shared_object(uuid)

    def queues_per_thread(self) -> Sequence[int]:
        with self._lock:
            return self.inner.queues_per_thread()

    def exit_event(self, thread_index: int) -> int | None:
        with self._lock:
            return self.inner.exit_event(thread_index)

    def queue_started(self, index: int, vring: VringT) -> None:
        with self._lock:
            self.inner.queue_started(index, vring)

    def set_device_state_fd(
        self, direction: DeviceStateDirection, phase: DeviceStatePhase, fd: int
    ) -> int | None:
        with self._lock:
            return self.inner.set_device_state_fd(direction, phase, fd)

    def check_device_state(self) -> None:
        with self._lock:
            self.inner.check_device_state()

    def get_shmem_config(self) -> Sequence[int]:
        with self._lock:
            return self.inner.get_shmem_config()


def serialized(backend: VhostUserBackend) -> VhostUserBackend:
    """The backend the daemon calls: a VhostUserBackendMut gets wrapped so
    that its hooks never run concurrently; others are used as they are."""
    if isinstance(backend, VhostUserBackendMut):
        return _Serialized(backend)
    return backend
