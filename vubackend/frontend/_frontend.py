# Frontend: a vhost-user front-end in Python. It connects to a backend (or
# waits for one), negotiates, owns guest RAM and virtqueues, and drives the
# session through the per-request methods of Requests.
#
# Rules of this module:
# - Roles: connect() is the client (the backend listens, as
#   qemu-storage-daemon and DPDK's vhost PMD do by default); listen() is the
#   server (it waits for a backend that connects, with a timeout).
# - Ownership: the Frontend owns its connection, the guest RAM it was given
#   (share_memory) or made (create_memory), every queue it set up with their
#   eventfds, the backend channel, and the dirty log it made. close() frees
#   all of them, in reverse order, once; a test counts fds to check it.
# - Sequences follow QEMU (vhost-user-protocol.md §4.1-§4.3): handshake() =
#   GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
#   SET_BACKEND_REQ_FD, SET_OWNER, SET_FEATURES; a queue starts with
#   NUM, BASE, ADDR, KICK, CALL (ERR), ENABLE 1, and stops with ENABLE 0 and
#   GET_VRING_BASE, whose answer is the base of the next start.
# - Features are masked: what is acked is what the backend offers and the
#   caller wants (plus bit 30 when offered).
# - Raw mode lives beside the typed engine; reading raw bytes puts the typed
#   engine out of step, so it is marked broken then.
# - Postcopy follows QEMU's destination (§4.8): enter_postcopy() = ADVISE
#   (the backend's uffd goes to a PostcopyPager, whose fault thread starts),
#   LISTEN, then the memory requests, whose client bases reach the pager
#   before QEMU's answer; leave_postcopy() places what is left, sends END
#   and closes the pager. The frontend owns the pager. A backend that echoes
#   our own addresses as its bases (libvhost-user does) has its real ones
#   read from its /proc/<pid>/maps (pid from SO_PEERCRED).

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
from collections.abc import Mapping, Sequence
from typing import Final, final

from vubackend.errors import (
    LocalProtocolError,
    PeerDisconnectedError,
    RemoteProtocolError,
    TransportError,
    VhostUserError,
)
from vubackend.frontend._channel import BackendChannel, BackendHook
from vubackend.frontend._dirty_log import DirtyLogBuffer
from vubackend.frontend._engine import DEFAULT_TIMEOUT
from vubackend.frontend._memory import GuestRam
from vubackend.frontend._postcopy import PostcopyPager
from vubackend.frontend._queue import FrontendQueue, QueueState
from vubackend.frontend._raw import RawReply, read_raw
from vubackend.frontend._requests import Requests
from vubackend.frontend._uffd import peer_pid
from vubackend.protocol import (
    MAX_MEM_REGIONS,
    BackendReq,
    Connection,
    DeviceStateDirection,
    FrontendReq,
    Inbound,
    Listener,
    Message,
    ProtocolFeatures,
    VirtioFeatures,
    VringAddrFlags,
    connect,
)

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "DeviceStatus", "Frontend"]

_P = ProtocolFeatures

# What the frontend asks for unless told otherwise: every protocol feature
# it implements. Not asked by default: PAGEFAULT (postcopy changes the
# memory requests), CROSS_ENDIAN and CRYPTO_SESSION (not implemented),
# HOST_NOTIFIER and SHMEM (we do not map backend pages), INBAND_NOTIFICATIONS
# (eventfds are simpler), XEN_MMAP, GET_VRING_BASE_INFLIGHT (unsettled).
DEFAULT_PROTOCOL_FEATURES: Final = (
    _P.MQ
    | _P.LOG_SHMFD
    | _P.RARP
    | _P.REPLY_ACK
    | _P.MTU
    | _P.BACKEND_REQ
    | _P.CONFIG
    | _P.BACKEND_SEND_FD
    | _P.INFLIGHT_SHMFD
    | _P.RESET_DEVICE
    | _P.CONFIGURE_MEM_SLOTS
    | _P.STATUS
    | _P.SHARED_OBJECT
    | _P.DEVICE_STATE
)


class DeviceStatus(enum.IntFlag):
    """The virtio device status byte (virtio 1.x §2.1), for SET_STATUS."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


@final
class Frontend(Requests):
    """A vhost-user frontend that drives any backend without a VM.

    Build one with :meth:`connect` (client role) or :meth:`listen` (server
    role). Every request of the protocol has a method (``get_features``,
    ``set_mem_table``, ``set_vring_kick``, ``get_config``, ...); higher-level
    methods do what QEMU does: :meth:`handshake`, :meth:`share_memory`,
    :meth:`setup_queue`, :meth:`stop_queue`/:meth:`start_queue`,
    :meth:`start_device`.

    Args:
        connection: a connected :class:`~vubackend.protocol.Connection` that
            reads ``Inbound.FRONTEND_REPLIES``; the frontend owns it.
        timeout: seconds any reply may take.

    Example::

        with Frontend.connect("/tmp/blk.sock") as fe:
            fe.handshake(VirtioFeatures.VERSION_1)
            fe.create_memory([16 << 20])
            queue = fe.setup_queue(0, 128)
    """

    def __init__(
        self, connection: Connection, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(connection, timeout=timeout)
        self._ram: GuestRam | None = None
        self._queues: dict[int, FrontendQueue] = {}
        self._channel: BackendChannel | None = None
        self._log: DirtyLogBuffer | None = None
        self._postcopy: PostcopyPager | None = None
        self._closed = False
        self.max_queues: int | None = None
        """GET_QUEUE_NUM's answer after :meth:`handshake` (None without MQ)."""
        self.max_mem_slots: int | None = None
        """GET_MAX_MEM_SLOTS's answer (None without CONFIGURE_MEM_SLOTS)."""
        self.postcopy_bases: dict[int, int] = {}
        """In postcopy: region GPA -> the backend's address of the region."""

    # ------------------------------------------------------------ roles

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = 5.0,
    ) -> Frontend:
        """Connect to a backend listening on ``path`` (the client role).

        Args:
            path: the backend's socket.
            timeout: seconds any reply may take.
            retry_for: keep retrying this long while the socket is missing
                or refuses (the backend is starting).

        Raises:
            TransportError: the backend could not be reached in time.
        """
        conn = connect(
            path, Inbound.FRONTEND_REPLIES, retry_for=retry_for, timeout=timeout
        )
        return cls(conn, timeout=timeout)

    @classmethod
    def listen(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        accept_timeout: float = 30.0,
    ) -> Frontend:
        """Listen on ``path`` and wait for one backend (the server role).

        The socket file is removed once the backend is connected.

        Args:
            path: where to create the socket.
            timeout: seconds any reply may take.
            accept_timeout: seconds to wait for the backend.

        Raises:
            TransportError: no backend connected in time, or the path is
                unusable.
        """
        with Listener(path) as listener:
            conn = listener.accept(Inbound.FRONTEND_REPLIES, timeout=accept_timeout)
        return cls(conn, timeout=timeout)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Frontend:
        """Wrap an already connected AF_UNIX socket (owned from now on), e.g.
        one end of a socketpair whose other end a backend serves."""
        return cls(Connection(sock, Inbound.FRONTEND_REPLIES), timeout=timeout)

    # ------------------------------------------------------------ handshake

    def negotiate_features(self, wanted: int) -> int:
        """GET_FEATURES then SET_FEATURES with ``offered & wanted``, plus bit 30
        when offered. Returns the acked features."""
        offered = self.get_features()
        acked = offered & wanted
        if offered & VirtioFeatures.PROTOCOL_FEATURES:
            acked |= VirtioFeatures.PROTOCOL_FEATURES
        self.set_features(acked)
        return acked

    def negotiate_protocol_features(self, wanted: ProtocolFeatures) -> ProtocolFeatures:
        """GET_PROTOCOL_FEATURES then SET_PROTOCOL_FEATURES with
        ``offered & wanted``. Returns the acked protocol features."""
        offered = self.get_protocol_features()
        acked = ProtocolFeatures(offered & wanted)
        self.set_protocol_features(acked)
        return acked

    def handshake(
        self,
        features: int,
        protocol_features: ProtocolFeatures = DEFAULT_PROTOCOL_FEATURES,
        *,
        backend_channel: bool = True,
        hooks: Mapping[BackendReq, BackendHook] | None = None,
    ) -> None:
        """The session start QEMU performs (§4.1), then SET_FEATURES.

        Args:
            features: the virtio feature bits wanted (device bits included);
                bit 30 is added when offered.
            protocol_features: the protocol features wanted.
            backend_channel: open the backend channel if BACKEND_REQ is
                negotiated.
            hooks: answers for backend-channel requests (see
                :class:`BackendChannel`).

        Raises:
            RemoteProtocolError, PeerDisconnectedError, TransportError: the
                backend failed a step.
        """
        offered = self.get_features()
        if offered & VirtioFeatures.PROTOCOL_FEATURES:
            self.negotiate_protocol_features(protocol_features)
        if self.has_protocol_feature(_P.MQ):
            self.max_queues = self.get_queue_num()
        if self.has_protocol_feature(_P.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self.get_max_mem_slots()
        if backend_channel and self.has_protocol_feature(_P.BACKEND_REQ):
            self.set_backend_req_fd(hooks)
        self.set_owner()
        acked = offered & features
        if offered & VirtioFeatures.PROTOCOL_FEATURES:
            acked |= VirtioFeatures.PROTOCOL_FEATURES
        self.set_features(acked)

    def start_device(self) -> None:
        """Tell the backend the driver is ready: with STATUS, SET_STATUS
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK (DPDK waits for it
        before it uses the rings); without STATUS nothing is sent."""
        if self.has_protocol_feature(_P.STATUS):
            self.set_status(
                DeviceStatus.ACKNOWLEDGE
                | DeviceStatus.DRIVER
                | DeviceStatus.FEATURES_OK
                | DeviceStatus.DRIVER_OK
            )

    # ------------------------------------------------------------ channel

    @property
    def backend_channel(self) -> BackendChannel | None:
        """The backend request channel, once :meth:`set_backend_req_fd` ran."""
        return self._channel

    def set_backend_req_fd(
        self, hooks: Mapping[BackendReq, BackendHook] | None = None
    ) -> BackendChannel:
        """SET_BACKEND_REQ_FD: open the backend request channel and serve it
        on a thread (BACKEND_REQ).

        Args:
            hooks: per-request answers replacing the defaults.

        Returns:
            The channel (owned by the frontend).
        """
        conn, theirs = Connection.pair(Inbound.BACKEND_REQUESTS)
        try:
            self.request(FrontendReq.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            conn.close()
            raise
        finally:
            theirs.close()
        if self._channel is not None:
            self._channel.close()
        self._channel = BackendChannel(
            conn,
            hooks=hooks,
            on_vring_call=self._signal_call,
            on_vring_err=self._signal_err,
        )
        return self._channel

    def _signal_call(self, index: int) -> None:
        queue = self._queues.get(index)
        if queue is not None and not queue.call.closed:
            queue.call.signal()

    def _signal_err(self, index: int) -> None:
        queue = self._queues.get(index)
        if queue is not None and queue.err is not None and not queue.err.closed:
            queue.err.signal()

    # ------------------------------------------------------------ memory

    @property
    def ram(self) -> GuestRam:
        """The guest RAM shared with the backend.

        Raises:
            LocalProtocolError: no memory was shared yet.
        """
        if self._ram is None:
            raise LocalProtocolError("no guest memory was shared yet")
        return self._ram

    def create_memory(
        self, sizes: Sequence[int] = (16 << 20,), *, hugetlb: bool = False, gap: int = 0
    ) -> GuestRam:
        """Make guest RAM (see :class:`GuestRam`) and :meth:`share_memory` it."""
        ram = GuestRam(sizes, hugetlb=hugetlb, gap=gap)
        try:
            self.share_memory(ram)
        except BaseException:
            ram.close()
            raise
        return ram

    def share_memory(
        self, ram: GuestRam, *, use_add_mem_reg: bool | None = None
    ) -> None:
        """Send ``ram`` to the backend and take ownership of it.

        Uses ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS is negotiated
        (as QEMU does), else SET_MEM_TABLE.

        Args:
            ram: the memory; closed with the frontend.
            use_add_mem_reg: force one way (None: as the features allow).

        Raises:
            LocalProtocolError: SET_MEM_TABLE with more than 8 regions.
        """
        slots = self.has_protocol_feature(_P.CONFIGURE_MEM_SLOTS)
        per_region = slots if use_add_mem_reg is None else use_add_mem_reg
        if self._ram is not None and self._ram is not ram:
            self._ram.close()
        self._ram = ram
        if per_region:
            for region in ram.regions:
                base = self.add_mem_region(region)
                if base is not None:
                    self.postcopy_bases[region.gpa] = base
            return
        if len(ram.regions) > MAX_MEM_REGIONS:
            raise LocalProtocolError(
                f"SET_MEM_TABLE carries at most {MAX_MEM_REGIONS} regions, not "
                f"{len(ram.regions)}; negotiate CONFIGURE_MEM_SLOTS"
            )
        bases = self.set_mem_table(ram.regions)
        if bases is not None:
            self.postcopy_bases = {
                r.gpa: b for r, b in zip(ram.regions, bases, strict=True)
            }

    # ------------------------------------------------------------ postcopy

    @property
    def postcopy(self) -> PostcopyPager | None:
        """The pager serving the backend's page faults, between
        :meth:`enter_postcopy` and :meth:`leave_postcopy`."""
        return self._postcopy

    def enter_postcopy(
        self, ram: GuestRam, *, use_add_mem_reg: bool | None = None
    ) -> PostcopyPager:
        """Become a postcopy destination as QEMU does (PAGEFAULT, §4.8):
        POSTCOPY_ADVISE, whose userfaultfd a new :class:`PostcopyPager` over
        ``ram`` serves from a fault thread; POSTCOPY_LISTEN; then
        :meth:`share_memory` in postcopy mode (the backend's region
        addresses reach the pager before QEMU's answer). Then make pages
        missing with the pager's ``stage``/``evict``.

        Args:
            ram: the memory to share (owned by the frontend from now on,
                even on failure).
            use_add_mem_reg: as for :meth:`share_memory`.

        Returns:
            The pager (owned by the frontend).

        Raises:
            LocalProtocolError: memory was shared already (LISTEN needs a
                backend without regions) or postcopy is on already.
            MappingError: userfaultfd is unavailable here.
        """
        if self._ram is not None or self._postcopy is not None:
            ram.close()
            raise LocalProtocolError(
                "enter_postcopy: the backend must have no memory yet and no "
                "postcopy in progress"
            )
        try:
            pager = PostcopyPager(ram)
        except BaseException:
            ram.close()
            raise
        self._postcopy = pager
        try:
            pager.attach(self.postcopy_advise())
            pager.start()
            self.postcopy_listen()
        except BaseException:
            self._postcopy = None
            pager.close()
            ram.close()
            raise
        self.share_memory(ram, use_add_mem_reg=use_add_mem_reg)
        return pager

    def leave_postcopy(self, *, place_remaining: bool = True) -> None:
        """End postcopy: place the pages still missing (the migration
        completes), POSTCOPY_END, then stop and close the pager.

        Args:
            place_remaining: place the missing pages first (False leaves
                them missing: a backend touching one then blocks until it
                closes its userfaultfd).

        Raises:
            LocalProtocolError: postcopy is not on.
        """
        pager = self._postcopy
        if pager is None:
            raise LocalProtocolError("leave_postcopy: postcopy is not on")
        try:
            if place_remaining:
                pager.place_all()
            self.postcopy_end()
        finally:
            self._postcopy = None
            pager.close()

    def _postcopy_regions_mapped(self, bases: dict[int, int]) -> dict[int, int]:
        pager = self._postcopy
        ram = self._ram
        if (
            pager is not None
            and ram is not None
            and all(ram.faddr(gpa) == address for gpa, address in bases.items())
        ):
            # The backend echoed our own addresses (libvhost-user does): find
            # its real ones in its /proc/<pid>/maps, or faults cannot be mapped.
            pid = peer_pid(self._conn.fileno())
            found = pager.bases_in_process(pid) if pid is not None else {}
            bases = {gpa: found.get(gpa, address) for gpa, address in bases.items()}
        if pager is not None:
            for client in pager.clients:
                for gpa, address in bases.items():
                    client.set_base(gpa, address)
        return bases

    # ------------------------------------------------------------ queues

    @property
    def queues(self) -> Mapping[int, FrontendQueue]:
        """The queues set up, by index."""
        return dict(self._queues)

    def setup_queue(
        self,
        index: int,
        size: int = 256,
        *,
        packed: bool | None = None,
        err: bool = False,
        start: bool = True,
    ) -> FrontendQueue:
        """Allocate a ring in guest RAM with eventfds, and start it.

        Args:
            index: the queue index.
            size: descriptors (a power of 2 for split rings).
            packed: the layout; None means packed iff RING_PACKED was acked.
            err: also make an error eventfd (SET_VRING_ERR).
            start: send the start sequence now (else call :meth:`start_queue`).

        Returns:
            The queue (owned by the frontend).
        """
        if index in self._queues:
            raise LocalProtocolError(f"queue {index} is already set up")
        if packed is None:
            packed = self.has_feature(VirtioFeatures.RING_PACKED)
        queue = FrontendQueue(self.ram, index, size, packed=packed, err=err)
        self._queues[index] = queue
        if start:
            self.start_queue(queue)
        return queue

    def start_queue(self, queue: FrontendQueue, *, enable: bool = True) -> None:
        """SET_VRING_NUM, SET_VRING_BASE (``queue.base``), SET_VRING_ADDR,
        SET_VRING_KICK, SET_VRING_CALL (and ERR), then SET_VRING_ENABLE 1
        when bit 30 was acked. Also the restart after :meth:`stop_queue`."""
        ram = self.ram
        index = queue.index
        self.set_vring_num(index, queue.size)
        self.set_vring_base(index, queue.base)
        logging = self._log is not None and self.has_feature(VirtioFeatures.LOG_ALL)
        self.set_vring_addr(
            index,
            desc=ram.faddr(queue.desc),
            used=ram.faddr(queue.used),
            avail=ram.faddr(queue.avail),
            log=queue.used,
            flags=int(VringAddrFlags.LOG) if logging else 0,
        )
        self.set_vring_kick(index, queue.kick.fileno())
        self.set_vring_call(index, queue.call.fileno())
        if queue.err is not None:
            self.set_vring_err(index, queue.err.fileno())
        if enable and self.has_feature(VirtioFeatures.PROTOCOL_FEATURES):
            self.set_vring_enable(index, True)
        queue.state = QueueState.RUNNING
        queue.starts += 1

    def stop_queue(self, queue: FrontendQueue) -> int:
        """SET_VRING_ENABLE 0 (when bit 30 was acked) then GET_VRING_BASE.

        Returns:
            The base, also kept in ``queue.base`` for the next start.
        """
        if self.has_feature(VirtioFeatures.PROTOCOL_FEATURES):
            self.set_vring_enable(queue.index, False)
        queue.base = self.get_vring_base(queue.index)
        queue.state = QueueState.STOPPED
        return queue.base

    def kick(self, queue: FrontendQueue) -> None:
        """Kick the queue's eventfd (new buffers are available)."""
        queue.kick.signal()

    # ------------------------------------------------------------ dirty log

    @property
    def dirty_log(self) -> DirtyLogBuffer | None:
        """The dirty log handed to the backend, if logging is on."""
        return self._log

    def start_dirty_log(self) -> DirtyLogBuffer:
        """Start logging as QEMU does before migrating (§4.7): SET_LOG_BASE
        with a new log covering the RAM, SET_FEATURES with LOG_ALL, then
        SET_VRING_ADDR with the log flag for every running queue.

        Returns:
            The log to read back (owned by the frontend).
        """
        log = DirtyLogBuffer(self.ram.end_gpa)
        try:
            self.set_log_base(log)
        except BaseException:
            log.close()
            raise
        if self._log is not None:
            self._log.close()
        self._log = log
        self.set_features(self.acked_features | VirtioFeatures.LOG_ALL)
        self._readdress_queues(log=True)
        return log

    def stop_dirty_log(self) -> None:
        """Stop logging: SET_FEATURES without LOG_ALL, SET_VRING_ADDR without
        the log flag; the log stays readable until the frontend closes."""
        self.set_features(self.acked_features & ~VirtioFeatures.LOG_ALL)
        self._readdress_queues(log=False)

    def _readdress_queues(self, *, log: bool) -> None:
        ram = self.ram
        for queue in self._queues.values():
            if queue.state is QueueState.RUNNING:
                self.set_vring_addr(
                    queue.index,
                    desc=ram.faddr(queue.desc),
                    used=ram.faddr(queue.used),
                    avail=ram.faddr(queue.avail),
                    log=queue.used,
                    flags=int(VringAddrFlags.LOG) if log else 0,
                )

    # ------------------------------------------------------------ device state

    def save_device_state(self) -> bytes:
        """SET_DEVICE_STATE_FD(SAVE) with a pipe, read the state to EOF, then
        CHECK_DEVICE_STATE (DEVICE_STATE).

        Raises:
            RemoteProtocolError: the backend refused or the check failed.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with self.set_device_state_fd(
                DeviceStateDirection.SAVE, write_end
            ) as reply:
                os.close(write_end)
                write_end = -1
                if reply.error:
                    raise RemoteProtocolError(
                        f"SET_DEVICE_STATE_FD: refused ({reply.error})",
                        request=int(FrontendReq.SET_DEVICE_STATE_FD),
                        recoverable=True,
                    )
                source = reply.take_fd()
                if source is not None:
                    os.close(read_end)
                    read_end = source
                data = self._read_to_eof(read_end)
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        self._check_state()
        return data

    def load_device_state(self, data: bytes) -> None:
        """SET_DEVICE_STATE_FD(LOAD) with a pipe, write ``data`` and close,
        then CHECK_DEVICE_STATE (DEVICE_STATE)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            with self.set_device_state_fd(DeviceStateDirection.LOAD, read_end) as reply:
                os.close(read_end)
                read_end = -1
                if reply.error:
                    raise RemoteProtocolError(
                        f"SET_DEVICE_STATE_FD: refused ({reply.error})",
                        request=int(FrontendReq.SET_DEVICE_STATE_FD),
                        recoverable=True,
                    )
                sink = reply.take_fd()
                if sink is not None:
                    os.close(write_end)
                    write_end = sink
                view = memoryview(data)
                while view:
                    view = view[os.write(write_end, view) :]
                os.close(write_end)
                write_end = -1
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        self._check_state()

    def _read_to_eof(self, fd: int) -> bytes:
        chunks: list[bytes] = []
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            if not poller.poll(int(self.timeout * 1000)):
                raise TransportError("device state: the backend stopped writing")
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def _check_state(self) -> None:
        value = self.check_device_state()
        if value:
            raise RemoteProtocolError(
                f"CHECK_DEVICE_STATE: the transfer failed ({value})",
                request=int(FrontendReq.CHECK_DEVICE_STATE),
                recoverable=True,
            )

    # ------------------------------------------------------------ raw mode

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, with ``fds`` (borrowed) on the first byte.
        Build malformed frames with :func:`frame`.

        Raises:
            PeerDisconnectedError: the backend is gone.
            TransportError: another socket failure.
        """
        self._conn.send_raw(data, fds)

    def read_raw(self, timeout: float | None = None) -> RawReply:
        """Read whatever the backend sends within ``timeout`` seconds
        (default: the frontend's timeout), bypassing the typed engine, which
        is then marked out of step if anything arrived."""
        reply = read_raw(
            self._conn.fileno(), self.timeout if timeout is None else timeout
        )
        if reply.data or reply.disconnected:
            self._break("raw bytes were read from the socket")
        return reply

    def exchange_raw(
        self, data: bytes, fds: Sequence[int] = (), *, timeout: float | None = None
    ) -> RawReply:
        """:meth:`send_raw` then :meth:`read_raw`: what did the backend do?
        A backend that already closed the socket shows as DISCONNECTED."""
        try:
            self.send_raw(data, fds)
        except (PeerDisconnectedError, TransportError) as exc:
            self._break(f"raw send failed: {exc}")
            return RawReply(disconnected=True)
        return self.read_raw(timeout)

    def is_alive(self, timeout: float = 1.0) -> bool:
        """Whether the backend still answers GET_FEATURES within ``timeout``
        (a probe after raw input; the typed engine must still be in step)."""
        if self._broken is not None:
            return False
        saved = self._timeout
        self._conn.settimeout(timeout)
        try:
            self.get_features()
        except VhostUserError:
            return False
        finally:
            self._conn.settimeout(saved)
        return True

    def request_message(self, message: Message) -> None:
        """Send a prepared typed message as it is (no gate, no ack wait)."""
        self._send(message)

    # ------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close everything the frontend owns: the backend channel, the
        queues and their eventfds, the postcopy pager, the dirty log, the
        RAM and the socket.
        Idempotent; never raises for a backend that is already gone."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()
        if self._postcopy is not None:
            self._postcopy.close()
            self._postcopy = None
        if self._log is not None:
            self._log.close()
        if self._ram is not None:
            self._ram.close()
        with contextlib.suppress(OSError):
            self._conn.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._queues)} queues"
        return f"<Frontend {state}>"
