"""vubackend: a typed Python framework for vhost-user device backends.

The layers (lowest first) are ``_native``, ``bitmap``, ``memory``, ``vring``
and ``protocol``, then ``daemon``, then ``frontend``, ``devices`` and the
``vubackend`` command. See docs/design.md.
"""

from vubackend.errors import (
    DaemonClosedError,
    DescriptorChainError,
    GuestMemoryError,
    InternalError,
    LocalProtocolError,
    MappingError,
    NativeHelperError,
    PeerDisconnectedError,
    ProtocolError,
    RemoteProtocolError,
    RingStateError,
    TransportError,
    UnmappedAddressError,
    VhostUserError,
    VringError,
)
from vubackend.protocol import (
    BackendReq,
    FrontendReq,
    ProtocolFeatures,
    VirtioFeatures,
)

__version__ = "0.1.0"

__all__ = [
    "BackendReq",
    "DaemonClosedError",
    "DescriptorChainError",
    "FrontendReq",
    "GuestMemoryError",
    "InternalError",
    "LocalProtocolError",
    "MappingError",
    "NativeHelperError",
    "PeerDisconnectedError",
    "ProtocolError",
    "ProtocolFeatures",
    "RemoteProtocolError",
    "RingStateError",
    "TransportError",
    "UnmappedAddressError",
    "VhostUserError",
    "VirtioFeatures",
    "VringError",
    "__version__",
]
