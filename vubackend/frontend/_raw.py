# Raw mode: send arbitrary (malformed) frames and fds on the main socket and
# read back whatever the backend answers, byte for byte, for tests of how a
# backend copes with bad input.
#
# Rules of this module:
# - Nothing is checked on the way out: `frame()` builds a header with any
#   request id, flags and size field, followed by any body.
# - Reading bypasses the typed decoder: raw reads take bytes straight from
#   the socket, so after raw traffic the typed request engine may be out of
#   step; Frontend marks it broken once raw bytes were read.
# - Every read has a timeout. Received fds are owned by the RawReply, which
#   closes them (close() / context manager).
# - observe() sums up what the backend did in plain terms (RawOutcome):
#   answered, closed the connection, or said nothing within the timeout.

from __future__ import annotations

import array
import enum
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Final, final

from vubackend.errors import TransportError
from vubackend.protocol import HEADER_SIZE, MAX_FDS_PER_MESSAGE, close_fds

__all__ = ["RawOutcome", "RawReply", "frame", "read_raw"]

_HEADER: Final = struct.Struct("=III")
_VERSION_1: Final = 0x1
_FD_SIZE: Final = array.array("i").itemsize


def frame(
    request: int,
    body: bytes = b"",
    *,
    flags: int = _VERSION_1,
    size: int | None = None,
) -> bytes:
    """Build a raw frame: a 12-byte header then ``body``.

    Args:
        request: the request id (any u32, known or not).
        body: the payload bytes (any length).
        flags: the header flags word (version 1 by default).
        size: the header's size field; ``len(body)`` when None (give another
            value to lie about the size).

    Returns:
        The bytes to send.
    """
    return _HEADER.pack(request, flags, len(body) if size is None else size) + body


class RawOutcome(enum.Enum):
    """What a backend did after raw input."""

    ANSWERED = "answered"  # bytes came back
    DISCONNECTED = "disconnected"  # it closed the connection
    SILENT = "silent"  # nothing within the timeout, connection still open


@final
@dataclass(slots=True)
class RawReply:
    """What came back on the socket after raw input.

    Attributes:
        data: the bytes received (possibly several messages, or part of one).
        fds: fds received with them, owned here.
        disconnected: the backend closed the connection (after ``data``).
    """

    data: bytes = b""
    fds: list[int] = field(default_factory=list)
    disconnected: bool = False

    @property
    def outcome(self) -> RawOutcome:
        """ANSWERED if any bytes came back, else DISCONNECTED or SILENT."""
        if self.data:
            return RawOutcome.ANSWERED
        return RawOutcome.DISCONNECTED if self.disconnected else RawOutcome.SILENT

    def headers(self) -> list[tuple[int, int, int]]:
        """The (request, flags, size) of each whole header in :attr:`data`,
        walking frame by frame."""
        out: list[tuple[int, int, int]] = []
        offset = 0
        while offset + HEADER_SIZE <= len(self.data):
            request, flags, size = _HEADER.unpack_from(self.data, offset)
            out.append((request, flags, size))
            offset += HEADER_SIZE + size
        return out

    def close(self) -> None:
        """Close the received fds. Idempotent."""
        fds, self.fds = self.fds, []
        close_fds(fds)

    def __enter__(self) -> RawReply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(received)
    return fds


def read_raw(fd: int, timeout: float, *, settle: float = 0.05) -> RawReply:
    """Read whatever arrives on socket ``fd`` within ``timeout`` seconds.

    Reading stops at end of file, or ``settle`` seconds after the last
    chunk once something arrived.

    Args:
        fd: the connected socket (borrowed; a duplicate is used).
        timeout: seconds to wait for the first byte.
        settle: seconds of quiet that end a reply.

    Raises:
        TransportError: the socket failed in another way.
    """
    sock = socket.socket(fileno=os.dup(fd))
    reply = RawReply()
    chunks: list[bytes] = []
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
        deadline = time.monotonic() + timeout
        while True:
            wait = deadline - time.monotonic() if not chunks else settle
            if wait <= 0 or not poller.poll(max(1, int(wait * 1000))):
                break
            try:
                data, ancdata, _flags, _ = sock.recvmsg(
                    65536,
                    socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                reply.disconnected = True
                break
            except OSError as exc:
                reply.close()
                raise TransportError(
                    f"raw read failed: {exc}", errno=exc.errno
                ) from exc
            reply.fds.extend(_fds_of(ancdata))
            if not data:
                reply.disconnected = True
                break
            chunks.append(data)
    finally:
        sock.close()
    reply.data = b"".join(chunks)
    return reply
