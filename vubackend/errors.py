"""Every exception vubackend raises, in one tree under :class:`VhostUserError`.

Rules of this module (the lowest layer; it imports nothing from vubackend):

* The abstract classes (``VhostUserError``, ``ProtocolError``, ...) cannot be
  raised directly: constructing one raises ``TypeError``. Raise the concrete
  leaf that says what happened.
* Each concrete class declares ``reconnect`` in its own body: whether a daemon
  that meets this error should drop the session and wait for the frontend to
  reconnect (True), or whether the error is local to one request or one
  operation (False). A test walks the tree and checks this.
* Messages are lowercase and name the failure, e.g.
  ``"SET_VRING_KICK: expected 1 fd, got 2"``. Structured details ride as
  attributes so that callers never parse text.
"""

from __future__ import annotations

from typing import ClassVar, Self

__all__ = [
    "DaemonClosedError",
    "DescriptorChainError",
    "DeviceError",
    "GuestMemoryError",
    "InternalError",
    "LocalProtocolError",
    "MappingError",
    "NativeHelperError",
    "PeerDisconnectedError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestRefusedError",
    "RingStateError",
    "SessionEndedError",
    "TransportError",
    "UnmappedAddressError",
    "UnsupportedRequestError",
    "VhostUserError",
    "VringError",
    "XenUnavailableError",
]


class VhostUserError(Exception):
    """Base of every vubackend error. Abstract: catch it, never raise it."""

    reconnect: ClassVar[bool]
    _abstract: ClassVar[bool] = True

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        if cls.__dict__.get("_abstract", False):
            raise TypeError(f"{cls.__name__} is abstract; raise a subclass")
        return super().__new__(cls, *args)


# ---------------------------------------------------------------- protocol


class ProtocolError(VhostUserError):
    """A vhost-user protocol rule was broken. Abstract."""

    _abstract = True


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    Attributes:
        request: the raw request id of the offending message, if its header
            could be read.
        need_reply: whether that message asked for a REPLY_ACK.
        recoverable: True when the whole message was consumed and the stream
            is still in step, so a daemon may answer with a non-zero ack and
            go on; False when framing is lost and the session must end.
    """

    reconnect = True
    _abstract = False

    def __init__(
        self,
        message: str,
        *,
        request: int | None = None,
        need_reply: bool = False,
        recoverable: bool = False,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.need_reply = need_reply
        self.recoverable = recoverable


class RequestRefusedError(RemoteProtocolError):
    """The peer answered a request with a failing REPLY_ACK (or another
    failure reply). The stream is in step (``recoverable`` is True).

    Attributes:
        code: the non-zero value the peer answered with.
    """

    reconnect = False
    _abstract = False

    def __init__(self, message: str, *, request: int, code: int) -> None:
        super().__init__(message, request=request, recoverable=True)
        self.code = code


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol does not allow
    (for example encoding a payload that fails its validator)."""

    reconnect = False
    _abstract = False


# ---------------------------------------------------------------- transport


class TransportError(VhostUserError):
    """The socket failed below the protocol (a system call returned an
    error). Raised ``from`` the ``OSError``; ``errno`` is copied."""

    reconnect = True
    _abstract = False

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class PeerDisconnectedError(VhostUserError):
    """The peer closed the connection.

    Attributes:
        mid_message: True if it went away in the middle of a message (a
            truncated header or payload), False on a clean close between
            messages.
    """

    reconnect = True
    _abstract = False

    def __init__(self, message: str, *, mid_message: bool = False) -> None:
        super().__init__(message)
        self.mid_message = mid_message


class SessionEndedError(VhostUserError):
    """A front-end request left the session unusable (for example a request
    that always has a reply body failed with no failure form to send); the
    daemon ends the session and waits for the next connection."""

    reconnect = True
    _abstract = False


class DaemonClosedError(VhostUserError):
    """The object was used after we closed or shut it down ourselves."""

    reconnect = False
    _abstract = False


# ---------------------------------------------------------------- memory


class GuestMemoryError(VhostUserError):
    """Guest memory could not be set up or accessed. Abstract."""

    _abstract = True


class UnmappedAddressError(GuestMemoryError):
    """No region (or no contiguous run of regions) covers the range.

    Attributes:
        address: the first address of the requested range.
        length: its length in bytes.
    """

    reconnect = False
    _abstract = False

    def __init__(self, message: str, *, address: int, length: int) -> None:
        super().__init__(message)
        self.address = address
        self.length = length


class MappingError(GuestMemoryError):
    """A region or log could not be mapped, or its description is invalid
    (overlap, overflow, zero size, too many regions, mmap failure)."""

    reconnect = False
    _abstract = False


class XenUnavailableError(MappingError):
    """Xen mappings cannot work on this host: ``/dev/xen`` or Xen's
    libraries are missing. The message names what is missing."""

    reconnect = False
    _abstract = False


# ---------------------------------------------------------------- vrings


class VringError(VhostUserError):
    """A virtqueue could not be used. Abstract."""

    _abstract = True


class DescriptorChainError(VringError):
    """A descriptor chain is malformed: loop, index out of range, chain too
    long, bad indirect table, address outside guest memory."""

    reconnect = False
    _abstract = False


class RingStateError(VringError):
    """A ring was used while stopped, or before its addresses were set, or
    configured with values the rules forbid."""

    reconnect = False
    _abstract = False


# ---------------------------------------------------------------- devices


class DeviceError(VhostUserError):
    """A device (a VhostUserBackend implementation) failed a request; the
    daemon answers the request with a failure and keeps the session."""

    reconnect = False
    _abstract = False


class UnsupportedRequestError(DeviceError):
    """The device does not implement this request (the hook kept its
    default); the daemon refuses the request and logs why."""

    reconnect = False
    _abstract = False


# ---------------------------------------------------------------- misc


class NativeHelperError(VhostUserError):
    """The compiled helper is missing or does not match this Python code.
    Raised at import; reinstall vubackend (``pip install .``)."""

    reconnect = False
    _abstract = False


class InternalError(VhostUserError):
    """A bug in vubackend. Please report it with the traceback."""

    reconnect = True
    _abstract = False
