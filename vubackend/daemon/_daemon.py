# VhostUserDaemon: accepts (or makes) connections, runs one session per
# connection on a request thread, and owns the worker threads.
#
# Rules:
# * One thread reads requests; workers (one per queues_per_thread entry)
#   serve kicks. Workers live as long as the daemon; sessions come and go.
# * Every connection is a fresh session: the request handler is new, and
#   when the session ends its rings are stopped, every fd it received is
#   closed and the memory table is unmapped.
# * A normal disconnect (clean or mid-message, as a quitting VMM does) ends a
#   session successfully, as in the seed; a broken stream is logged.
# * shutdown() may be called from any thread (not from a signal handler:
#   it takes a lock).

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import final

from vubackend.daemon._backend import VhostUserBackend, serialized
from vubackend.daemon._handler import RequestHandler
from vubackend.daemon._worker import VringEpollHandler
from vubackend.errors import (
    DaemonClosedError,
    PeerDisconnectedError,
    RemoteProtocolError,
    SessionEndedError,
    TransportError,
    VhostUserError,
)
from vubackend.memory import GuestMemoryAtomic, MemoryBackend
from vubackend.protocol import (
    Connection,
    FrontendReq,
    Inbound,
    Listener,
    Message,
    OwnedFds,
    ProtocolFeatures,
    VirtioFeatures,
    close_fds,
    connect,
    spec_for,
)
from vubackend.vring import VringRwLock, VringT

__all__ = ["VhostUserDaemon"]

log = logging.getLogger("vubackend.daemon")


def _names(flags: ProtocolFeatures | VirtioFeatures) -> str:
    return "|".join(flag.name or "?" for flag in flags) or "none"


@final
class VhostUserDaemon:
    """Serve one vhost-user device (the seed's ``VhostUserDaemon``).

    Args:
        name: used in thread names and logs.
        backend: the device.
        memory: the guest memory handle; a fresh one by default.
        memory_backend: how a fresh handle maps regions (``select_backend``:
            plain mmap by default, Xen with ``xen=True``); only without
            ``memory``.
        vring_type: ``VringRwLock`` (default) or ``VringMutex``.

    Raises:
        ValueError: the device's queue count, queue size or worker masks are
            unusable, or both memory and memory_backend were given.
    """

    def __init__(
        self,
        name: str,
        backend: VhostUserBackend,
        memory: GuestMemoryAtomic | None = None,
        *,
        vring_type: Callable[[GuestMemoryAtomic, int], VringT] = VringRwLock,
        memory_backend: MemoryBackend | None = None,
    ) -> None:
        self.name = name
        self._backend = serialized(backend)
        if memory is not None and memory_backend is not None:
            raise ValueError("give memory or memory_backend, not both")
        self._memory = (
            memory if memory is not None else GuestMemoryAtomic(backend=memory_backend)
        )
        num_queues = self._backend.num_queues()
        max_size = self._backend.max_queue_size()
        if not 0 < num_queues <= 256:
            raise ValueError(f"num_queues {num_queues} is not in 1..256")
        if not 0 < max_size <= 32768 or max_size & (max_size - 1):
            raise ValueError(
                f"max_queue_size {max_size} is not a power of two <= 32768"
            )
        self._vrings: list[VringT] = [
            vring_type(self._memory, max_size) for _ in range(num_queues)
        ]
        self._masks = list(self._backend.queues_per_thread())
        if not self._masks:
            raise ValueError("queues_per_thread() is empty")
        self._workers = [
            VringEpollHandler(
                self._backend,
                [v for i, v in enumerate(self._vrings) if mask >> i & 1],
                thread_id,
                num_queues,
                self._worker_failed,
            )
            for thread_id, mask in enumerate(self._masks)
        ]
        for worker in self._workers:
            worker.start()
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._result: BaseException | None = None
        self._stopping = threading.Event()
        # Clear while a session runs (on any thread, serve's included).
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self.worker_errors: list[BaseException] = []

    # ------------------------------------------------------------ public

    def get_epoll_handlers(self) -> list[VringEpollHandler]:
        """The workers, to add custom fds with ``register_listener``."""
        return list(self._workers)

    @property
    def vrings(self) -> list[VringT]:
        """The device's vrings, by index (for reports: ``with
        vring.get_ref() as state: state.kicks, state.calls``)."""
        return list(self._vrings)

    @property
    def memory(self) -> GuestMemoryAtomic:
        return self._memory

    def serve(
        self, path: str | os.PathLike[str] | Listener, *, reconnect: bool = True
    ) -> None:
        """Listen on ``path`` and serve sessions until :meth:`shutdown`
        (``reconnect``) or until the first session ends.

        Args:
            path: the socket path, or a :class:`Listener` already listening
                (created first to report a bad path before serving; the
                daemon takes it over and closes it).
            reconnect: keep accepting new sessions after one ends.

        Raises:
            TransportError: the socket could not be created.
            VhostUserError: a session ended with an error (not reconnect).
        """
        listener = path if isinstance(path, Listener) else Listener(path)
        with self._lock:
            self._listener = listener
        try:
            while not self._stopping.is_set():
                try:
                    connection = listener.accept(Inbound.FRONTEND_REQUESTS)
                except (DaemonClosedError, TransportError):
                    if self._stopping.is_set():
                        return
                    raise
                log.info("%s: front-end connected on %s", self.name, listener.path)
                error = self._run_session(connection)
                if not reconnect:
                    if error is not None:
                        raise error
                    return
        finally:
            listener.close()
            with self._lock:
                self._listener = None

    def start(self, listener: Listener) -> None:
        """Accept one connection on ``listener`` and serve it on a thread;
        :meth:`wait` for it."""
        connection = listener.accept(Inbound.FRONTEND_REQUESTS)
        self._start_thread(connection)

    def start_client(
        self, path: str | os.PathLike[str], *, retry_for: float = 0.0
    ) -> None:
        """Connect to a front-end listening on ``path`` (retrying for
        ``retry_for`` seconds) and serve it on a thread."""
        connection = connect(path, Inbound.FRONTEND_REQUESTS, retry_for=retry_for)
        log.info("%s: connected to the front-end at %s", self.name, os.fspath(path))
        self._start_thread(connection)

    def wait(self) -> None:
        """Wait for the session started by start/start_client to end.

        Raises:
            VhostUserError: the session ended with an error other than a
                disconnect.
        """
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        result, self._result = self._result, None
        if result is not None:
            raise result

    def shutdown(self) -> None:
        """End the current session and stop serving; thread-safe."""
        self._stopping.set()
        with self._lock:
            connection, listener = self._connection, self._listener
        if connection is not None:
            # Unblocks the request thread's recvmsg; it then ends the session.
            with contextlib.suppress(OSError):
                dup = socket.socket(fileno=os.dup(connection.fileno()))
                dup.shutdown(socket.SHUT_RDWR)
                dup.close()
        if listener is not None:
            listener.close()

    def close(self) -> None:
        """Shut down, wait for the session, stop the workers, unmap memory."""
        if self._closed:
            return
        self._closed = True
        self.shutdown()
        if self._thread is not None:
            self._thread.join()
        # A session served by serve() runs on the caller's thread: let it
        # finish (it stops its rings) before the workers go.
        self._idle.wait()
        for worker in self._workers:
            worker.close()

    def __enter__(self) -> VhostUserDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ sessions

    def _start_thread(self, connection: Connection) -> None:
        def run() -> None:
            self._result = self._run_session(connection)

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def _worker_failed(self, thread_id: int, exc: BaseException) -> None:
        self.worker_errors.append(exc)

    def _run_session(self, connection: Connection) -> VhostUserError | None:
        handler = RequestHandler(
            self._backend, self._memory, self._vrings, self._workers, self._masks
        )
        with self._lock:
            self._connection = connection
            self._idle.clear()
        try:
            return self._serve_requests(connection, handler)
        finally:
            with self._lock:
                self._connection = None
            handler.close()
            connection.close()
            self._idle.set()
            log.info("%s: session ended; rings stopped, memory unmapped", self.name)

    def _serve_requests(
        self, connection: Connection, handler: RequestHandler
    ) -> VhostUserError | None:
        while True:
            try:
                message = connection.receive()
            except RemoteProtocolError as exc:
                log.warning("%s: bad message from the front-end: %s", self.name, exc)
                if not exc.recoverable:
                    return None if self._stopping.is_set() else exc
                self._nack(connection, handler, exc)
                continue
            except PeerDisconnectedError as exc:
                log.info("%s: %s", self.name, exc)
                return None
            except (TransportError, DaemonClosedError) as exc:
                if self._stopping.is_set():
                    return None
                log.warning("%s: %s", self.name, exc)
                return exc
            with OwnedFds(message.fds) as fds:
                log.debug("%s: %s %s", self.name, message.request.name, message.payload)
                try:
                    reply = handler.handle(message, fds)
                except SessionEndedError as exc:
                    log.warning("%s: ending the session: %s", self.name, exc)
                    return exc
                self._log_progress(message, handler)
                # Memory regions are 40 bytes from the ack of XEN_MMAP on.
                xen = bool(handler.acked_protocol & ProtocolFeatures.XEN_MMAP)
                connection.decoder.xen_mmap = xen
            # Postcopy replies to the memory requests carry the table.
            connection.decoder.postcopy = handler.postcopy.listening
            if reply is not None:
                try:
                    connection.send(reply)
                except (PeerDisconnectedError, TransportError) as exc:
                    log.info("%s: %s", self.name, exc)
                    return None
                finally:
                    close_fds(reply.fds)
            try:
                handler.postcopy.after_reply(connection)
            except SessionEndedError as exc:
                log.warning("%s: ending the session: %s", self.name, exc)
                return exc

    def _nack(
        self, connection: Connection, handler: RequestHandler, exc: RemoteProtocolError
    ) -> None:
        # A malformed request that asked for an ack gets a failing one, if
        # its id is known and it has no reply body of its own.
        if not (exc.need_reply and handler.reply_ack and exc.request is not None):
            return
        try:
            request = FrontendReq(exc.request)
        except ValueError:
            return
        if spec_for(request).has_reply_body:
            return
        connection.send(Message.ack(request, success=False))

    def _log_progress(self, message: Message, handler: RequestHandler) -> None:
        request = message.request
        if request is FrontendReq.SET_FEATURES:
            log.info(
                "%s: negotiated virtio features %s",
                self.name,
                _names(VirtioFeatures(handler.acked_features)),
            )
        elif request is FrontendReq.SET_PROTOCOL_FEATURES:
            log.info(
                "%s: negotiated protocol features %s",
                self.name,
                _names(handler.acked_protocol),
            )
        elif request in (
            FrontendReq.SET_MEM_TABLE,
            FrontendReq.ADD_MEM_REG,
            FrontendReq.REM_MEM_REG,
        ):
            with self._memory.memory() as mem:
                log.info(
                    "%s: guest memory now %d region(s), %d MiB",
                    self.name,
                    len(mem.regions),
                    sum(r.size for r in mem.regions) >> 20,
                )
