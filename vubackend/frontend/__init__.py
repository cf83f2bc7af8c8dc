"""vubackend.frontend: a vhost-user frontend in Python, to drive any backend
(ours, qemu-storage-daemon, DPDK's vhost PMD) without a VM.

* :class:`Frontend`: both socket roles (``connect``, ``listen``), feature and
  protocol-feature negotiation with masking, REPLY_ACK, a method per request
  of the protocol, QEMU's sequences (``handshake``, ``share_memory``,
  ``setup_queue``, ``stop_queue``/``start_queue``), dirty logging, device
  state transfer, and a raw mode for malformed frames.
* :class:`GuestRam`: memfd (or hugetlbfs) guest RAM with an allocator,
  addressed by guest physical address.
* :class:`FrontendQueue`, :class:`EventFd`: a virtqueue's rings and notifiers.
* :class:`BackendChannel`: the backend request channel, served on a thread.
* Drivers: :class:`BlkDriver`, :class:`NetDriver`, :class:`RngDriver`, on
  :class:`DriverRing` (:func:`make_driver_ring`): a queue's driver side,
  ``vubackend.vring``'s ``SplitDriverRing`` / ``PackedDriverRing`` with a
  token per chain.
* :class:`DirtyLogBuffer`, :class:`InflightBuffer`, :class:`DeviceStateReply`.
* :func:`frame`, :class:`RawReply`, :class:`RawOutcome`: raw mode.
* Postcopy (``Frontend.enter_postcopy``/``leave_postcopy``):
  :class:`PostcopyPager` (missing pages, their placement with UFFDIO_COPY
  and the fault thread), :class:`PostcopyClient`, :class:`PostcopyStats`,
  :class:`Userfaultfd`, :class:`UffdEvent`, :func:`userfaultfd_unavailable`.
* Xen (XEN_MMAP): :class:`XenRegion`, :func:`xen_region`,
  :func:`share_xen_memory` send the frontend's RAM as Xen foreign or grant
  regions, with device handles as fds.
* ``vubackend.frontend.testing``: pytest fixtures.
"""

from vubackend.frontend._blk import (
    SECTOR_SIZE,
    BlkDriver,
    BlkRequest,
    BlkRequestType,
    BlkStatus,
)
from vubackend.frontend._channel import (
    BackendAnswer,
    BackendChannel,
    BackendEvent,
    BackendHook,
)
from vubackend.frontend._dirty_log import LOG_PAGE_SIZE, DirtyLogBuffer
from vubackend.frontend._driver_ring import DriverRing, make_driver_ring
from vubackend.frontend._engine import DEFAULT_TIMEOUT
from vubackend.frontend._eventfd import EventFd
from vubackend.frontend._frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    DeviceStatus,
    Frontend,
)
from vubackend.frontend._memory import FADDR_BASE, HUGE_PAGE_SIZE, GuestRam, RamRegion
from vubackend.frontend._net import NET_HEADER_SIZE, NetDriver
from vubackend.frontend._postcopy import PostcopyClient, PostcopyPager, PostcopyStats
from vubackend.frontend._queue import FrontendQueue, QueueState
from vubackend.frontend._raw import RawOutcome, RawReply, frame
from vubackend.frontend._results import DeviceStateReply, InflightBuffer
from vubackend.frontend._rng import RngDriver
from vubackend.frontend._uffd import UffdEvent, Userfaultfd, userfaultfd_unavailable
from vubackend.frontend._xen import XenRegion, share_xen_memory, xen_region

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "DEFAULT_TIMEOUT",
    "FADDR_BASE",
    "HUGE_PAGE_SIZE",
    "LOG_PAGE_SIZE",
    "NET_HEADER_SIZE",
    "SECTOR_SIZE",
    "BackendAnswer",
    "BackendChannel",
    "BackendEvent",
    "BackendHook",
    "BlkDriver",
    "BlkRequest",
    "BlkRequestType",
    "BlkStatus",
    "DeviceStateReply",
    "DeviceStatus",
    "DirtyLogBuffer",
    "DriverRing",
    "EventFd",
    "Frontend",
    "FrontendQueue",
    "GuestRam",
    "InflightBuffer",
    "NetDriver",
    "PostcopyClient",
    "PostcopyPager",
    "PostcopyStats",
    "QueueState",
    "RamRegion",
    "RawOutcome",
    "RawReply",
    "RngDriver",
    "UffdEvent",
    "Userfaultfd",
    "XenRegion",
    "frame",
    "make_driver_ring",
    "share_xen_memory",
    "userfaultfd_unavailable",
    "xen_region",
]
