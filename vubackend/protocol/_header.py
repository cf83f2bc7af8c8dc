# The 12-byte message header: request u32, flags u32, size u32, host byte
# order (docs/reference/vhost-user-protocol.md §1.2).
#
# Rules: this module only packs and unpacks; which checks apply to a header
# depends on what the reader expects (a request or a reply), so the checks
# are functions the codec calls, each returning a plain-words reason or None.

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, final

from vubackend.protocol._constants import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    RESERVED_FLAGS_MASK,
    VERSION_MASK,
    HeaderFlags,
)

__all__ = ["Header"]

_HEADER: Final = struct.Struct("=III")
assert _HEADER.size == HEADER_SIZE


@final
@dataclass(frozen=True, slots=True)
class Header:
    """A raw header as read from the wire; ``request`` is not yet known to be
    a valid id, and ``flags`` may hold reserved bits."""

    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decode exactly :data:`HEADER_SIZE` bytes."""
        request, flags, size = _HEADER.unpack(data)
        return cls(request, flags, size)

    def pack(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    def framing_problem(self) -> str | None:
        """A reason why the bytes after this header cannot be trusted to be
        framed by ``size`` (the stream is lost), or None."""
        if self.version != 1:
            return (
                f"unsupported protocol version {self.version} (flags {self.flags:#x})"
            )
        if self.size > MAX_PAYLOAD_SIZE:
            return f"payload size {self.size} exceeds the {MAX_PAYLOAD_SIZE}-byte limit"
        return None

    def flags_problem(self, *, expect_reply: bool) -> str | None:
        """A reason why the flags are wrong for a request (``expect_reply``
        False) or a reply (True), or None."""
        reserved = self.flags & RESERVED_FLAGS_MASK
        if reserved:
            return f"reserved header flag bits set ({reserved:#x})"
        if expect_reply and not self.is_reply:
            return "a reply must have the REPLY flag"
        if expect_reply and self.need_reply:
            return "a reply must not have the NEED_REPLY flag"
        if not expect_reply and self.is_reply:
            return "a request must not have the REPLY flag"
        return None
