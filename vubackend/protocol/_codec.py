# The sans-IO codec: Message, the Decoder that is fed bytes and fds and
# yields typed messages, and the encoder for both directions.
#
# Theory of operation
# -------------------
# vhost-user runs over a byte stream; file descriptors ride as SCM_RIGHTS
# on the sendmsg that carries a message's header. The kernel never merges a
# chunk that carries fds into data received before it, so every batch of fds
# arrives together with (at the latest) the first byte of its message. The
# Decoder therefore remembers, for each fd, the stream offset of the chunk
# it came with, and gives a message every fd that arrived while its bytes
# were being received. A transport that reads exactly `bytes_needed` bytes
# at a time (as ours does) gets exact attribution.
#
# Errors come in two kinds (RemoteProtocolError.recoverable):
# * framing errors (bad version, size over 4 KiB): the stream is lost; the
#   decoder closes every fd it holds and refuses all further input;
# * message errors (unknown id, bad flags, bad size for the type, bad field
#   values, wrong fd count, truncated fds): the whole message has been read
#   and its fds are closed; the decoder stays usable, so a daemon can answer
#   with a failing REPLY_ACK and go on.
#
# Fd ownership: fds fed to the decoder belong to it until a message carries
# them out; from then on they belong to whoever received the message (wrap
# them in OwnedFds). Fds of a rejected message are closed here.

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, final

from vubackend.errors import LocalProtocolError, RemoteProtocolError
from vubackend.protocol._constants import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    BackendReq,
    FrontendReq,
    HeaderFlags,
)
from vubackend.protocol._header import Header
from vubackend.protocol._payloads import U64, Empty, Payload
from vubackend.protocol._spec import (
    BACKEND_REQUEST_SPEC,
    FRONTEND_REQUEST_SPEC,
    FdRule,
    RequestSpec,
    fd_count_problem,
    spec_for,
)

__all__ = [
    "NEED_DATA",
    "Decoder",
    "Inbound",
    "Message",
    "NeedData",
    "OwnedFds",
    "close_fds",
    "encode",
    "request_name",
]


def request_name(request: int, *, backend: bool = False) -> str:
    """The spec name of a request id, or ``request <n>`` when unknown."""
    space: type[FrontendReq | BackendReq] = BackendReq if backend else FrontendReq
    try:
        return space(request).name
    except ValueError:
        return f"request {request}"


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones that are already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@final
@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message: a request or a reply on either channel.

    ``fds`` are plain integers. In a message you send they are borrowed (the
    transport does not close them). In a message you received you own them:
    pass them to :class:`OwnedFds` or close them.
    """

    request: FrontendReq | BackendReq
    payload: Payload = field(default_factory=Empty)
    flags: HeaderFlags = HeaderFlags.VERSION_1
    fds: tuple[int, ...] = ()

    @classmethod
    def new_request(
        cls,
        request: FrontendReq | BackendReq,
        payload: Payload | None = None,
        *,
        need_reply: bool = False,
        fds: Sequence[int] = (),
    ) -> Message:
        """A request, with NEED_REPLY when ``need_reply``."""
        flags = HeaderFlags.VERSION_1
        if need_reply:
            flags |= HeaderFlags.NEED_REPLY
        return cls(
            request, payload if payload is not None else Empty(), flags, tuple(fds)
        )

    @classmethod
    def new_reply(
        cls,
        request: FrontendReq | BackendReq,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> Message:
        """A reply (flags exactly VERSION_1 | REPLY, as QEMU demands)."""
        flags = HeaderFlags.VERSION_1 | HeaderFlags.REPLY
        return cls(
            request, payload if payload is not None else Empty(), flags, tuple(fds)
        )

    @classmethod
    def ack(cls, request: FrontendReq | BackendReq, *, success: bool = True) -> Message:
        """The REPLY_ACK answer: u64 0 on success, 1 on failure."""
        return cls.new_reply(request, U64(0 if success else 1))

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def spec(self) -> RequestSpec:
        """The protocol table row of this message's request."""
        return spec_for(self.request)

    def close_fds(self) -> None:
        """Close every fd the message carries (for received messages)."""
        close_fds(self.fds)


@final
class OwnedFds:
    """Owns a set of received fds. ``take`` hands one over to the caller;
    ``close`` (or leaving the ``with`` block) closes all the others."""

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[int]) -> None:
        self._fds: list[int | None] = list(fds)

    def __len__(self) -> int:
        return sum(fd is not None for fd in self._fds)

    def take(self, index: int = 0) -> int:
        """Transfer ownership of fd ``index`` to the caller.

        Raises:
            IndexError: no fd there, or it was already taken.
        """
        fd = self._fds[index]
        if fd is None:
            raise IndexError(f"fd {index} was already taken")
        self._fds[index] = None
        return fd

    def borrow(self, index: int = 0) -> int:
        """Fd ``index``, still owned here (closed with the others).

        Raises:
            IndexError: no fd there, or it was already taken.
        """
        fd = self._fds[index]
        if fd is None:
            raise IndexError(f"fd {index} was already taken")
        return fd

    def close(self) -> None:
        """Close every fd not taken. Idempotent."""
        fds = [fd for fd in self._fds if fd is not None]
        self._fds = [None] * len(self._fds)
        close_fds(fds)

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Inbound(enum.Enum):
    """What a Decoder reads: which channel, from which side."""

    # What a back-end reads on the main socket.
    FRONTEND_REQUESTS = enum.auto()
    # What a front-end reads on the main socket.
    FRONTEND_REPLIES = enum.auto()
    # What a front-end reads on the backend channel.
    BACKEND_REQUESTS = enum.auto()
    # What a back-end reads on the backend channel.
    BACKEND_REPLIES = enum.auto()

    @property
    def is_reply(self) -> bool:
        return self in (Inbound.FRONTEND_REPLIES, Inbound.BACKEND_REPLIES)

    @property
    def is_backend_channel(self) -> bool:
        return self in (Inbound.BACKEND_REQUESTS, Inbound.BACKEND_REPLIES)


class NeedData(enum.Enum):
    """Returned by Decoder.next_message when a message is not complete."""

    NEED_DATA = 0


NEED_DATA: Final = NeedData.NEED_DATA


def _expected_payloads(
    spec: RequestSpec, *, reply: bool, xen_mmap: bool, postcopy: bool
) -> tuple[tuple[type[Payload], ...], FdRule]:
    """The payload types and fd rule a message of this kind may have."""
    if not reply:
        return (spec.payload_type(xen_mmap=xen_mmap),), spec.fds
    if postcopy and spec.postcopy_reply is not None:
        return (spec.postcopy_reply,), FdRule.NONE
    if spec.reply:
        return spec.reply, spec.reply_fds
    return (U64,), FdRule.NONE  # a REPLY_ACK


def _decode_payload(
    name: str, expected: tuple[type[Payload], ...], body: bytes
) -> Payload:
    problems = []
    for payload_type in expected:
        problem = payload_type.size_problem(len(body))
        if problem is None:
            payload = payload_type.unpack(body)
            payload.validate()
            return payload
        problems.append(problem)
    raise LocalProtocolError(f"{name}: {'; '.join(problems)}")


@final
class Decoder:
    """Turns a byte stream plus received fds into :class:`Message` objects.

    Feed it with :meth:`receive_data`, then call :meth:`next_message` until
    it returns :data:`NEED_DATA`. It does no I/O.

    Args:
        inbound: which channel and direction the bytes come from.
        xen_mmap: decode memory regions in their 40-byte Xen form (set it
            when XEN_MMAP is negotiated; may be changed between messages).
        postcopy: expect the postcopy replies to SET_MEM_TABLE / ADD_MEM_REG
            (front-end side only).
    """

    def __init__(
        self, inbound: Inbound, *, xen_mmap: bool = False, postcopy: bool = False
    ) -> None:
        self.inbound = inbound
        self.xen_mmap = xen_mmap
        self.postcopy = postcopy
        self._buffer = bytearray()
        self._base = 0  # stream offset of _buffer[0]
        self._fds: list[tuple[int, int]] = []  # (stream offset, fd)
        self._truncated: list[int] = []  # stream offsets of MSG_CTRUNC chunks
        self._broken: str | None = None

    # ------------------------------------------------------------ input

    def receive_data(
        self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False
    ) -> None:
        """Append received bytes and the fds that came with them.

        Args:
            data: the bytes, possibly empty.
            fds: fds received with this chunk; the decoder owns them now.
            fds_truncated: the kernel reported MSG_CTRUNC for this chunk (the
                peer sent more fds than the control buffer holds).
        """
        offset = self._base + len(self._buffer)
        if self._broken is not None:
            close_fds(fds)
            raise self._broken_error()
        self._fds.extend((offset, fd) for fd in fds)
        if fds_truncated:
            self._truncated.append(offset)
        self._buffer += data

    @property
    def bytes_needed(self) -> int:
        """How many more bytes complete the header, or else the payload, of
        the message in progress (a header is read first: 12 bytes)."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        header = Header.unpack(self._buffer[:HEADER_SIZE])
        if header.framing_problem() is not None:
            return 0
        return max(0, HEADER_SIZE + header.size - len(self._buffer))

    @property
    def in_message(self) -> bool:
        """True if part of a message (or fds for one) has been received."""
        return bool(self._buffer) or bool(self._fds)

    @property
    def broken(self) -> bool:
        """True once a framing error made the stream unusable."""
        return self._broken is not None

    def close(self) -> None:
        """Close every fd still held; the decoder then refuses input."""
        fds = [fd for _, fd in self._fds]
        self._fds.clear()
        self._buffer.clear()
        if self._broken is None:
            self._broken = "the decoder was closed"
        close_fds(fds)

    # ------------------------------------------------------------ output

    def next_message(self) -> Message | NeedData:
        """The next complete message, or NEED_DATA.

        Raises:
            RemoteProtocolError: the message (``recoverable``) or the stream
                (not ``recoverable``) is malformed. Fds of the offending
                message are already closed.
        """
        if self._broken is not None:
            raise self._broken_error()
        if len(self._buffer) < HEADER_SIZE:
            return NEED_DATA
        header = Header.unpack(self._buffer[:HEADER_SIZE])
        backend = self.inbound.is_backend_channel
        name = request_name(header.request, backend=backend)
        framing = header.framing_problem()
        if framing is not None:
            self._break(f"{name}: {framing}")
            raise RemoteProtocolError(
                f"{name}: {framing}",
                request=header.request,
                need_reply=header.need_reply,
                recoverable=False,
            )
        total = HEADER_SIZE + header.size
        if len(self._buffer) < total:
            return NEED_DATA

        body = bytes(self._buffer[HEADER_SIZE:total])
        end = self._base + total
        fds = tuple(fd for offset, fd in self._fds if offset < end)
        self._fds = [(offset, fd) for offset, fd in self._fds if offset >= end]
        truncated = any(offset < end for offset in self._truncated)
        self._truncated = [offset for offset in self._truncated if offset >= end]
        del self._buffer[:total]
        self._base = end

        try:
            return self._build(header, name, body, fds, truncated)
        except LocalProtocolError as exc:
            close_fds(fds)
            raise RemoteProtocolError(
                str(exc),
                request=header.request,
                need_reply=header.need_reply,
                recoverable=True,
            ) from exc

    def _build(
        self,
        header: Header,
        name: str,
        body: bytes,
        fds: tuple[int, ...],
        truncated: bool,
    ) -> Message:
        table = (
            BACKEND_REQUEST_SPEC
            if self.inbound.is_backend_channel
            else FRONTEND_REQUEST_SPEC
        )
        space: type[FrontendReq | BackendReq] = (
            BackendReq if self.inbound.is_backend_channel else FrontendReq
        )
        try:
            request = space(header.request)
        except ValueError:
            raise LocalProtocolError(f"unknown request id {header.request}") from None
        flags_problem = header.flags_problem(expect_reply=self.inbound.is_reply)
        if flags_problem is not None:
            raise LocalProtocolError(f"{name}: {flags_problem}")
        if truncated:
            raise LocalProtocolError(
                f"{name}: more than {MAX_FDS_PER_MESSAGE} fds attached (control "
                "data truncated, MSG_CTRUNC)"
            )
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise LocalProtocolError(
                f"{name}: {len(fds)} fds attached, "
                f"at most {MAX_FDS_PER_MESSAGE} allowed"
            )
        spec = table[request]
        expected, fd_rule = _expected_payloads(
            spec,
            reply=self.inbound.is_reply,
            xen_mmap=self.xen_mmap,
            postcopy=self.postcopy,
        )
        try:
            payload = _decode_payload(name, expected, body)
        except LocalProtocolError as exc:
            reason = str(exc)
            if not reason.startswith(name):
                reason = f"{name}: {reason}"
            raise LocalProtocolError(reason) from None
        fd_problem = fd_count_problem(fd_rule, payload, len(fds))
        if fd_problem is not None:
            raise LocalProtocolError(f"{name}: {fd_problem}")
        return Message(request, payload, HeaderFlags(header.flags), fds)

    def _break(self, reason: str) -> None:
        self._broken = reason
        fds = [fd for _, fd in self._fds]
        self._fds.clear()
        self._buffer.clear()
        close_fds(fds)

    def _broken_error(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"the stream is unusable after an earlier error: {self._broken}",
            recoverable=False,
        )


def encode(
    message: Message, *, xen_mmap: bool = False, postcopy: bool = False
) -> bytes:
    """Encode ``message`` (header and payload) after checking it against the
    protocol table. Its fds are not touched: send them with the bytes.

    Raises:
        LocalProtocolError: the payload type, field values, fd count or size
            do not fit the request.
    """
    spec = message.spec
    name = message.request.name
    reserved = int(message.flags) & ~int(
        HeaderFlags.VERSION_1 | HeaderFlags.REPLY | HeaderFlags.NEED_REPLY
    )
    if reserved or not message.flags & HeaderFlags.VERSION_1:
        raise LocalProtocolError(f"{name}: bad header flags {int(message.flags):#x}")
    if message.is_reply and message.need_reply:
        raise LocalProtocolError(f"{name}: a reply must not have NEED_REPLY")
    expected, fd_rule = _expected_payloads(
        spec, reply=message.is_reply, xen_mmap=xen_mmap, postcopy=postcopy
    )
    if type(message.payload) not in expected:
        allowed = ", ".join(t.__name__ for t in expected)
        raise LocalProtocolError(
            f"{name}: payload {type(message.payload).__name__} is not one of {allowed}"
        )
    message.payload.validate()
    body = message.payload.pack()
    problem = type(message.payload).size_problem(len(body))
    if problem is not None:
        raise LocalProtocolError(f"{name}: {problem}")
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{name}: payload of {len(body)} bytes is too large")
    if len(message.fds) > MAX_FDS_PER_MESSAGE:
        raise LocalProtocolError(
            f"{name}: {len(message.fds)} fds, at most {MAX_FDS_PER_MESSAGE} allowed"
        )
    fd_problem = fd_count_problem(fd_rule, message.payload, len(message.fds))
    if fd_problem is not None:
        raise LocalProtocolError(f"{name}: {fd_problem}")
    header = Header(int(message.request), int(message.flags), len(body))
    return header.pack() + body
