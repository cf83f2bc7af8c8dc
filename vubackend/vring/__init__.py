"""vubackend.vring: virtqueues.

* :class:`VringMutex`, :class:`VringRwLock`: one queue shared by the request
  thread and a worker, behind a mutex or a readers-writer lock; both satisfy
  :class:`VringT`. :class:`VringState` is the queue itself with its eventfds,
  enabled flag and memory handle; :class:`VringGuard` holds it under a lock.
* :class:`Queue`: configuration, positions and the data path of one ring
  (split, or packed with VIRTIO_F_RING_PACKED), with every guard against a
  hostile guest; :class:`QueueFeatures` says which ring features were
  negotiated.
* :class:`DescriptorChain`: a popped request: readable and writable buffers
  (possibly spanning memory regions), read/write helpers that log writes.
  :class:`ChainBatch`: chains popped together without an object per chain
  (``pop_batches``: ids and lengths per batch; ``add_used_heads`` completes
  them), for data paths that run per batch.
* :class:`SplitDriverRing`, :class:`PackedDriverRing`: the driver side, for
  tests and for the frontend.
* :func:`need_event`: the event-index test; :class:`RwLock`: the lock.
* :class:`InflightTracker`: what a ring records its in-flight heads in
  (INFLIGHT_SHMFD), and resubmits from after a reconnect.
"""

from vubackend.vring._chain import ChainBatch, ChainSegment, DescriptorChain
from vubackend.vring._defs import (
    DESC_SIZE,
    MAX_CHAIN_SEGMENTS,
    MAX_INDIRECT_DESCRIPTORS,
    MAX_QUEUE_SIZE,
    QueueFeatures,
    need_event,
)
from vubackend.vring._driver_packed import PackedDriverRing, packed_layout
from vubackend.vring._driver_split import SplitDriverRing, split_layout
from vubackend.vring._queue import Queue
from vubackend.vring._rwlock import RwLock
from vubackend.vring._state import VringState
from vubackend.vring._tracker import InflightTracker
from vubackend.vring._vring import VringGuard, VringMutex, VringRwLock, VringT

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_SEGMENTS",
    "MAX_INDIRECT_DESCRIPTORS",
    "MAX_QUEUE_SIZE",
    "ChainBatch",
    "ChainSegment",
    "DescriptorChain",
    "InflightTracker",
    "PackedDriverRing",
    "Queue",
    "QueueFeatures",
    "RwLock",
    "SplitDriverRing",
    "VringGuard",
    "VringMutex",
    "VringRwLock",
    "VringState",
    "VringT",
    "need_event",
    "packed_layout",
    "split_layout",
]
