# The socket transport: a Connection over AF_UNIX SOCK_STREAM that moves
# Messages with their fds, a Listener, and connect-with-retry.
#
# The sans-IO modules never import this one; it sits beside them so that the
# daemon and the frontend share it.
#
# Fd ownership
# ------------
# * Fds are received with MSG_CMSG_CLOEXEC, so a fork+exec never inherits
#   them, and handed to the Decoder at once: from then on the Decoder owns
#   them until a Message carries them out (then the caller owns them) or the
#   message is rejected (then the Decoder closes them).
# * MSG_CTRUNC (the peer attached more fds than the 8 the protocol allows)
#   is reported to the Decoder, which rejects that message; the fds that did
#   arrive are closed with it, the kernel drops the rest.
# * Reads ask for exactly the bytes the Decoder still needs, so a message's
#   fds are never read together with the previous message.
# * Fds in a Message you send are borrowed: send() never closes them.

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Sequence
from typing import Final, final

from vubackend.errors import (
    DaemonClosedError,
    PeerDisconnectedError,
    TransportError,
)
from vubackend.protocol._codec import NEED_DATA, Decoder, Inbound, Message, encode
from vubackend.protocol._constants import MAX_FDS_PER_MESSAGE

__all__ = ["Connection", "Listener", "connect"]

_FD_SIZE: Final = array.array("i").itemsize
# Room for exactly the protocol's maximum; more sets MSG_CTRUNC.
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
_DISCONNECT_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})
_RETRY_ERRNOS: Final = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN})


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            # A truncated cmsg may end in a partial int; only whole ones count.
            received.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(received)
    return fds


def _transport_error(what: str, exc: OSError) -> TransportError | PeerDisconnectedError:
    if exc.errno in _DISCONNECT_ERRNOS:
        return PeerDisconnectedError(f"{what}: the peer went away ({exc.strerror})")
    if isinstance(exc, TimeoutError):
        return TransportError(f"{what}: timed out", errno=errno.ETIMEDOUT)
    return TransportError(f"{what}: {exc.strerror or exc}", errno=exc.errno)


@final
class Connection:
    """A vhost-user connection: sends and receives whole messages with fds.

    ``send`` and ``receive`` may be called from different threads; each is
    serialised by its own lock, so several threads may send (the backend
    channel is used from worker threads).

    Args:
        sock: a connected AF_UNIX SOCK_STREAM socket; the connection owns it.
        inbound: what this side reads (e.g. ``Inbound.FRONTEND_REQUESTS`` for
            a back-end's main socket).
        timeout: seconds a send or receive may block, or None for ever. A
            receive that times out can be retried: partial input is kept.
    """

    def __init__(
        self,
        sock: socket.socket,
        inbound: Inbound = Inbound.FRONTEND_REQUESTS,
        *,
        timeout: float | None = None,
    ) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise TransportError("vhost-user needs an AF_UNIX SOCK_STREAM socket")
        sock.settimeout(timeout)
        self._sock = sock
        self._decoder = Decoder(inbound)
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_fd(
        cls, fd: int, inbound: Inbound, *, timeout: float | None = None
    ) -> Connection:
        """Wrap a socket fd received from the peer (SET_BACKEND_REQ_FD); the
        connection takes ownership of ``fd`` and closes it on error."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise TransportError(f"fd {fd} is not a usable socket: {exc}") from exc
        return cls(sock, inbound, timeout=timeout)

    @classmethod
    def pair(cls, inbound: Inbound) -> tuple[Connection, socket.socket]:
        """A connection plus the peer end of a fresh socketpair, e.g. for
        the backend channel; send the peer end's fd, then close it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours, inbound), theirs

    # ------------------------------------------------------------ state

    @property
    def decoder(self) -> Decoder:
        """The Decoder reading this connection (set ``xen_mmap`` and
        ``postcopy`` on it as negotiation proceeds)."""
        return self._decoder

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        """Close the socket and every fd received but not handed out."""
        if self._closed:
            return
        self._closed = True
        self._decoder.close()
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DaemonClosedError("the connection is closed")

    # ------------------------------------------------------------ sending

    def send(self, message: Message) -> None:
        """Encode and send ``message``; its fds ride with the header.

        Raises:
            LocalProtocolError: the message does not fit the protocol table.
            PeerDisconnectedError: the peer closed the socket.
            TransportError: any other socket failure.
        """
        data = encode(
            message, xen_mmap=self._decoder.xen_mmap, postcopy=self._decoder.postcopy
        )
        self.send_raw(data, message.fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, with ``fds`` on the first byte. For tests
        and the raw mode of the frontend: nothing is checked."""
        self._check_open()
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            if fds
            else []
        )
        view = memoryview(data)
        with self._send_lock:
            try:
                sent = self._sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
                while sent < len(view):
                    sent += self._sock.send(view[sent:], socket.MSG_NOSIGNAL)
            except OSError as exc:
                raise _transport_error("send failed", exc) from exc

    # ------------------------------------------------------------ receiving

    def receive(self) -> Message:
        """Block until one whole message has arrived and return it. The
        caller owns the fds of the returned message.

        Raises:
            RemoteProtocolError: the message is malformed (see
                ``recoverable``); its fds are already closed.
            PeerDisconnectedError: the peer closed the socket (``mid_message``
                tells whether a message was cut short).
            TransportError: any other socket failure, or a timeout.
        """
        self._check_open()
        with self._receive_lock:
            while True:
                message = self._decoder.next_message()
                if message is not NEED_DATA:
                    return message
                self._receive_chunk(self._decoder.bytes_needed)

    def _receive_chunk(self, size: int) -> None:
        try:
            data, ancdata, msg_flags, _ = self._sock.recvmsg(
                size, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:
            raise _transport_error("receive failed", exc) from exc
        fds = _fds_from_ancillary(ancdata)
        if not data:
            mid_message = self._decoder.in_message or bool(fds)
            self._decoder.close()
            for fd in fds:
                os.close(fd)
            if mid_message:
                raise PeerDisconnectedError(
                    "the peer disconnected in the middle of a message",
                    mid_message=True,
                )
            raise PeerDisconnectedError("the peer disconnected")
        self._decoder.receive_data(
            data, fds, fds_truncated=bool(msg_flags & socket.MSG_CTRUNC)
        )


# ---------------------------------------------------------------- listening


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left behind by a process that died
        return
    except OSError as exc:
        raise TransportError(f"cannot probe {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise TransportError(
        f"{path} is in use by a running process", errno=errno.EADDRINUSE
    )


@final
class Listener:
    """A listening vhost-user socket (the server role).

    Args:
        path: where to create the socket. A stale socket file left by a dead
            process is removed; a live one or a non-socket is an error.
        mode: permissions of the socket file (applied before listen(), so no
            one can connect through wider permissions).
        backlog: listen() backlog.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 1
    ) -> None:
        self._path = os.fspath(path)
        _remove_stale_socket(self._path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._path)
            os.chmod(self._path, mode)
            self._inode = os.stat(self._path).st_ino
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise TransportError(
                f"cannot listen on {self._path}: {exc.strerror}", errno=exc.errno
            ) from exc
        self._sock = sock
        self._closed = False

    @property
    def path(self) -> str:
        return self._path

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(
        self,
        inbound: Inbound,
        *,
        timeout: float | None = None,
    ) -> Connection:
        """Wait for a peer and return the connection.

        Raises:
            TransportError: on timeout (``errno == ETIMEDOUT``) or failure.
            DaemonClosedError: the listener was closed.
        """
        if self._closed:
            raise DaemonClosedError("the listener is closed")
        try:
            # Inside the try: close() may run in another thread right now.
            self._sock.settimeout(timeout)
            sock, _ = self._sock.accept()
        except OSError as exc:
            if self._closed:
                raise DaemonClosedError("the listener was closed") from exc
            raise _transport_error(f"accept on {self._path} failed", exc) from exc
        sock.settimeout(None)
        return Connection(sock, inbound)

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self._closed:
            return
        self._closed = True
        # shutdown() wakes a thread blocked in accept(); close() alone does
        # not on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            if os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    path: str | os.PathLike[str],
    inbound: Inbound,
    *,
    retry_for: float = 0.0,
    interval: float = 0.1,
    timeout: float | None = None,
) -> Connection:
    """Connect to a listening peer (the client role).

    Args:
        path: the peer's socket.
        inbound: what this side will read.
        retry_for: keep retrying for this many seconds while the socket does
            not exist or refuses connections (the peer is starting).
        interval: seconds between attempts.
        timeout: the connection's send/receive timeout.

    Raises:
        TransportError: the peer could not be reached in time.
    """
    target = os.fspath(path)
    deadline = time.monotonic() + retry_for
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            if exc.errno in _RETRY_ERRNOS and time.monotonic() < deadline:
                time.sleep(interval)
                continue
            raise TransportError(
                f"cannot connect to {target}: {exc.strerror}", errno=exc.errno
            ) from exc
        return Connection(sock, inbound, timeout=timeout)
