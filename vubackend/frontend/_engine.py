# The request engine of the frontend: sends one request, waits for its reply
# or its REPLY_ACK, and keeps the negotiated features that decide both.
#
# Rules of this module:
# - One request at a time: a lock covers "send, then read the reply", so
#   requests from several threads never interleave their replies.
# - Which requests wait for what comes from the protocol table
#   (FRONTEND_REQUEST_SPEC): a request with a reply body waits for it (and
#   never for an ack); any other request carries NEED_REPLY when REPLY_ACK is
#   negotiated and `need_reply` is on (the default), and then waits for the
#   u64 ack. A non-zero ack raises RemoteProtocolError naming the request
#   and the value (`request` holds the id).
# - Every wait has a timeout (Frontend `timeout`, 5 s by default). After a
#   timeout, a disconnect or a framing error the stream is out of step: the
#   engine is marked broken and every later typed request raises at once
#   (raw mode still works). A non-zero ack leaves it usable.
# - Gates: before sending, a request whose protocol or virtio gate was not
#   negotiated raises LocalProtocolError, unless `check_gates` is False
#   (tests that probe a backend's refusals turn it off).
# - A reply for another request, or with fds it should not carry, is a
#   RemoteProtocolError; unexpected fds are closed.

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from typing import Final

from vubackend.errors import (
    LocalProtocolError,
    PeerDisconnectedError,
    RemoteProtocolError,
    RequestRefusedError,
    TransportError,
    VhostUserError,
)
from vubackend.protocol import (
    U64,
    Connection,
    FrontendReq,
    Message,
    Payload,
    ProtocolFeatures,
    VirtioFeatures,
    gate_problem,
    spec_for,
)

__all__ = ["DEFAULT_TIMEOUT", "RequestEngine"]

# Seconds any single reply may take before the backend counts as hung.
DEFAULT_TIMEOUT: Final = 5.0


class RequestEngine:
    """Base of :class:`~vubackend.frontend.Frontend`: the connection, the
    negotiated features and the request/reply mechanics."""

    def __init__(self, connection: Connection, *, timeout: float) -> None:
        self._conn = connection
        self._conn.settimeout(timeout)
        self._timeout = timeout
        self._lock = threading.RLock()
        self._broken: str | None = None
        self.offered_features = 0
        self.acked_features = 0
        self.offered_protocol_features = ProtocolFeatures(0)
        self.acked_protocol_features = ProtocolFeatures(0)
        self.need_reply = True
        """Set NEED_REPLY on ack-only requests when REPLY_ACK is negotiated."""
        self.check_gates = True
        """Refuse, before sending, requests whose feature is not negotiated."""

    # ------------------------------------------------------------ state

    @property
    def connection(self) -> Connection:
        """The main socket's connection (for raw mode and special cases)."""
        return self._conn

    @property
    def timeout(self) -> float:
        """Seconds any reply may take."""
        return self._timeout

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK is negotiated."""
        return bool(self.acked_protocol_features & ProtocolFeatures.REPLY_ACK)

    @property
    def broken(self) -> str | None:
        """Why the stream is out of step (then typed requests refuse), or
        None while it is usable."""
        return self._broken

    def has_protocol_feature(self, feature: ProtocolFeatures) -> bool:
        """Whether ``feature`` was negotiated (acked by SET_PROTOCOL_FEATURES)."""
        return bool(self.acked_protocol_features & feature)

    def has_feature(self, feature: int) -> bool:
        """Whether the virtio feature bits ``feature`` were all acked."""
        return self.acked_features & feature == feature

    # ------------------------------------------------------------ engine

    def _check_usable(self, request: FrontendReq) -> None:
        if self._broken is not None:
            raise PeerDisconnectedError(
                f"{request.name}: the connection is unusable: {self._broken}"
            )

    def _gate(self, request: FrontendReq) -> None:
        if not self.check_gates:
            return
        problem = gate_problem(
            spec_for(request),
            protocol_features=self.acked_protocol_features,
            virtio_features=VirtioFeatures(self.acked_features),
        )
        if problem is not None:
            raise LocalProtocolError(f"{request.name}: {problem}")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    def _receive(self, request: FrontendReq) -> Message:
        try:
            return self._conn.receive()
        except TransportError as exc:
            if exc.errno == errno.ETIMEDOUT:
                self._break(f"{request.name}: no reply within {self._timeout} s")
                raise TransportError(
                    f"{request.name}: no reply within {self._timeout} s",
                    errno=errno.ETIMEDOUT,
                ) from exc
            self._break(str(exc))
            raise
        except PeerDisconnectedError as exc:
            self._break(f"the backend disconnected ({exc})")
            raise PeerDisconnectedError(
                f"{request.name}: the backend disconnected before replying",
                mid_message=exc.mid_message,
            ) from exc
        except RemoteProtocolError as exc:
            # A whole message was skipped: still in step only if it was this
            # request's reply; otherwise that reply is yet to come.
            if not exc.recoverable or exc.request != int(request):
                self._break(str(exc))
            raise RemoteProtocolError(
                f"{request.name}: bad reply: {exc}",
                request=exc.request,
                recoverable=exc.recoverable,
            ) from exc

    def _receive_reply(self, request: FrontendReq) -> Message:
        reply = self._receive(request)
        if reply.request != request:
            reply.close_fds()
            self._break(
                f"reply to {reply.request.name} while waiting for {request.name}"
            )
            raise RemoteProtocolError(
                f"{request.name}: the backend replied to {reply.request.name} instead",
                request=int(reply.request),
            )
        return reply

    def _send(self, message: Message) -> None:
        request = message.request
        assert isinstance(request, FrontendReq)
        try:
            self._conn.send(message)
        except PeerDisconnectedError as exc:
            self._break(f"{request.name}: send failed: {exc}")
            raise PeerDisconnectedError(
                f"{request.name}: the backend disconnected ({exc})"
            ) from exc
        except TransportError as exc:
            self._break(f"{request.name}: send failed: {exc}")
            raise TransportError(f"{request.name}: {exc}", errno=exc.errno) from exc

    def request(
        self,
        request: FrontendReq,
        payload: Payload | None = None,
        *,
        fds: Sequence[int] = (),
    ) -> Message | None:
        """Send one request and wait for what it gets back.

        The general form behind every helper method; use it for requests
        that have no helper.

        Args:
            request: which request.
            payload: its payload (``Empty`` when None).
            fds: fds to attach (borrowed; they are not closed).

        Returns:
            The reply for a request with a reply body (the caller owns its
            fds), else None (after a zero ack when one was asked for).

        Raises:
            LocalProtocolError: the request is not negotiated, or the payload
                does not fit it.
            RemoteProtocolError: a bad reply, or a non-zero REPLY_ACK.
            PeerDisconnectedError: the backend went away.
            TransportError: no reply within the timeout, or a socket error.
        """
        self._check_usable(request)
        self._gate(request)
        spec = spec_for(request)
        want_ack = self.reply_ack and self.need_reply and not spec.has_reply_body
        message = Message.new_request(request, payload, need_reply=want_ack, fds=fds)
        with self._lock:
            self._send(message)
            if spec.has_reply_body or self._postcopy_reply(request):
                return self._receive_reply(request)
            if want_ack:
                self._check_ack(request, self._receive_reply(request))
        return None

    def _postcopy_reply(self, request: FrontendReq) -> bool:
        # In postcopy listening mode the memory requests are answered with
        # the table (vhost-user-protocol.md §4.8).
        return self._conn.decoder.postcopy and request in (
            FrontendReq.SET_MEM_TABLE,
            FrontendReq.ADD_MEM_REG,
        )

    def _check_ack(self, request: FrontendReq, reply: Message) -> None:
        if reply.fds:
            reply.close_fds()
            raise RemoteProtocolError(
                f"{request.name}: REPLY_ACK came with {len(reply.fds)} fds",
                request=int(request),
            )
        payload = reply.payload
        if not isinstance(payload, U64):
            raise RemoteProtocolError(
                f"{request.name}: REPLY_ACK is not a u64", request=int(request)
            )
        if payload.value != 0:
            raise RequestRefusedError(
                f"{request.name}: the backend refused it (REPLY_ACK {payload.value})",
                request=int(request),
                code=payload.value,
            )

    def _u64_reply(self, request: FrontendReq, payload: Payload | None = None) -> int:
        reply = self.request(request, payload)
        assert reply is not None
        if reply.fds:
            reply.close_fds()
            raise RemoteProtocolError(
                f"{request.name}: unexpected fds in the reply", request=int(request)
            )
        if not isinstance(reply.payload, U64):
            raise RemoteProtocolError(
                f"{request.name}: the reply is not a u64", request=int(request)
            )
        return reply.payload.value

    def _fail_reply(self, request: FrontendReq, why: str) -> VhostUserError:
        return RemoteProtocolError(f"{request.name}: {why}", request=int(request))
