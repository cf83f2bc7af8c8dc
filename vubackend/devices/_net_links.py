# Links of the virtio-net device: where the frames the guest sends go, and
# where the frames it receives come from.
#
# Rules:
# * A link sees frames without their virtio-net header. Frames from the
#   guest are handed over as the descriptor chains themselves (readable part
#   = header + frame), so that a link that does not look at the bytes (the
#   sink) costs nothing per frame; frame_pieces() gives the bytes as views of
#   guest memory, valid only during the call.
# * Every method of a link for queue pair k runs on the worker thread of
#   pair k; the pairs never share state in a link except counters, which are
#   per pair.
# * transmit() may take fewer frames than offered (back-pressure): the
#   device keeps the rest and offers them again when the link can take them
#   (the loopback link waits for the guest's RX buffers this way, so that it
#   loses no frame). receive() returns a frame only when the device has room.
# * A link that needs the kernel (a TAP device) opens its fds in attach()
#   and closes them in close(); errors are DeviceError with the OS reason.

from __future__ import annotations

import abc
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, final

from vubackend.errors import DeviceError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vubackend.vring import ChainBatch, DescriptorChain

__all__ = [
    "Deliver",
    "Link",
    "LoopbackLink",
    "SinkLink",
    "TapLink",
    "frame_length",
    "frame_pieces",
]

Deliver = Callable[[int, "Sequence[DescriptorChain] | ChainBatch", int], int]
"""``deliver(pair, chains, header_size) -> taken``: the device writes the
frames of TX chains (a list, or a whole batch: then natively) into the
guest's RX queue of ``pair`` (for links that loop frames back), in order,
and says how many it handled (from the first)."""


def frame_length(chain: DescriptorChain, header_size: int) -> int:
    """Bytes of the frame in a TX chain (its readable part minus the
    virtio-net header; 0 for a chain shorter than the header)."""
    return max(chain.readable_len - header_size, 0)


def frame_pieces(chain: DescriptorChain, header_size: int) -> list[memoryview]:
    """The frame in a TX chain as views of guest memory, header skipped.

    The views are valid while the chain is being handled (until the call
    that received it returns); copy what must live longer.
    """
    pieces = chain.readable_buffers()
    skip = header_size
    while pieces and skip:
        first = pieces[0]
        if len(first) > skip:
            pieces[0] = first[skip:]
            break
        skip -= len(first)
        del pieces[0]
    return pieces


class Link(abc.ABC):
    """What a :class:`NetDevice` exchanges frames with.

    Subclass it to add a link: implement :meth:`transmit`, and
    :meth:`receive` plus :meth:`fileno` for frames toward the guest.
    """

    def attach(self, queue_pairs: int, deliver: Deliver) -> None:
        """Called once by the device before it serves anything.

        Args:
            queue_pairs: the device's queue pairs (link calls name one).
            deliver: writes frames into the guest's RX queues.

        Raises:
            DeviceError: the link cannot be opened.
        """
        del queue_pairs, deliver

    def close(self) -> None:
        """Release the link's resources (the device's close calls it)."""
        return

    def fileno(self, pair: int) -> int | None:
        """An fd that becomes readable when :meth:`receive` has frames for
        ``pair``, or None (the device then asks whenever the guest posts
        RX buffers)."""
        del pair
        return None

    @abc.abstractmethod
    def transmit(
        self, pair: int, frames: Sequence[DescriptorChain], header_size: int
    ) -> int:
        """Frames the guest sent on queue pair ``pair``.

        Args:
            pair: the queue pair.
            frames: TX chains; use :func:`frame_pieces` for their bytes.
            header_size: bytes of virtio-net header in front of each frame.

        Returns:
            How many of ``frames`` (from the first) the link took; the
            device offers the others again later.
        """

    def transmit_batch(self, pair: int, batch: ChainBatch, header_size: int) -> int:
        """:meth:`transmit` for a batch of chains popped together (the
        device's fast path). The default hands the batch's chains to
        :meth:`transmit`; a link that needs only the frames' lengths (a
        sink, a counter) overrides it and never makes an object per frame.

        Returns:
            How many of the batch's chains (from the first) the link took.
        """
        return self.transmit(pair, batch.chains(), header_size)

    def receive(self, pair: int) -> bytes | bytearray | memoryview | None:
        """The next frame for the guest on ``pair``, or None.

        Called only when the device has room for it. A buffer returned may
        be reused by the next call.
        """
        del pair
        return None

    def receive_many(self, pair: int, limit: int) -> Sequence[Buffer]:
        """Up to ``limit`` frames for the guest on ``pair`` (fewer, or none,
        when the link has no more now), for the device's batch path, which
        writes them into as many RX buffers in one native call.

        The device asks only for frames it has buffers for; one that does
        not fit its buffer waits for the next ones. Each buffer returned is
        the caller's (not reused by later calls). The default calls
        :meth:`receive` and copies; a link that makes frames cheaply
        overrides it.
        """
        frames: list[Buffer] = []
        while len(frames) < limit:
            got = self.receive(pair)
            if got is None:
                break
            frames.append(bytes(got))
        return frames


@final
class LoopbackLink(Link):
    """Every frame the guest sends on a queue pair comes back to it on the
    same pair's RX queue, unchanged. Frames wait in the TX queue while the
    guest has no RX buffer free: none is lost."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def attach(self, queue_pairs: int, deliver: Deliver) -> None:
        del queue_pairs
        self._deliver = deliver

    def transmit(
        self, pair: int, frames: Sequence[DescriptorChain], header_size: int
    ) -> int:
        if self._deliver is None:
            raise DeviceError("the loopback link is not attached to a device")
        return self._deliver(pair, frames, header_size)

    def transmit_batch(self, pair: int, batch: ChainBatch, header_size: int) -> int:
        if self._deliver is None:
            raise DeviceError("the loopback link is not attached to a device")
        return self._deliver(pair, batch, header_size)


@final
class SinkLink(Link):
    """Counts and drops every frame the guest sends; optionally sends the
    guest copies of one frame, as fast as it posts RX buffers (for
    benchmarks of the receive direction).

    Args:
        generate: the frame to send the guest (without virtio-net header),
            or None to send nothing.
        count: how many frames to send per queue pair (None: no end).
    """

    def __init__(self, generate: bytes | None = None, count: int | None = None) -> None:
        if generate is not None and not generate:
            raise ValueError("the generated frame is empty")
        if count is not None and count < 0:
            raise ValueError(f"count {count} is negative")
        self._frame = generate
        self._count = count
        self._dropped: list[int] = [0]
        self._dropped_bytes: list[int] = [0]
        self._generated: list[int] = [0]

    def attach(self, queue_pairs: int, deliver: Deliver) -> None:
        del deliver
        self._dropped = [0] * queue_pairs
        self._dropped_bytes = [0] * queue_pairs
        self._generated = [0] * queue_pairs

    @property
    def frames_dropped(self) -> int:
        """Frames the guest sent (and the link dropped), all pairs."""
        return sum(self._dropped)

    @property
    def bytes_dropped(self) -> int:
        """Bytes of those frames."""
        return sum(self._dropped_bytes)

    @property
    def frames_generated(self) -> int:
        """Frames sent to the guest, all pairs."""
        return sum(self._generated)

    def transmit(
        self, pair: int, frames: Sequence[DescriptorChain], header_size: int
    ) -> int:
        self._dropped[pair] += len(frames)
        self._dropped_bytes[pair] += sum(
            max(c.readable_len - header_size, 0) for c in frames
        )
        return len(frames)

    def transmit_batch(self, pair: int, batch: ChainBatch, header_size: int) -> int:
        n = len(batch)
        self._dropped[pair] += n
        # A chain shorter than its header counts as 0 bytes.
        self._dropped_bytes[pair] += batch.readable_bytes(header_size)
        return n

    def receive(self, pair: int) -> bytes | bytearray | memoryview | None:
        frame = self._frame
        if frame is None:
            return None
        if self._count is not None and self._generated[pair] >= self._count:
            return None
        self._generated[pair] += 1
        return frame

    def receive_many(self, pair: int, limit: int) -> Sequence[Buffer]:
        frame = self._frame
        if frame is None:
            return []
        if self._count is not None:
            limit = min(limit, self._count - self._generated[pair])
        if limit <= 0:
            return []
        self._generated[pair] += limit
        return [frame] * limit


# <linux/if_tun.h>
_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_MULTI_QUEUE: Final = 0x0100
_IFNAMSIZ: Final = 16
# The largest frame a TAP device hands over (64 KiB of IP plus Ethernet).
_MAX_FRAME: Final = 65536 + 14


@final
class TapLink(Link):
    """A Linux TAP device (``/dev/net/tun``, ``IFF_TAP | IFF_NO_PI``),
    existing or created: frames both ways. With several queue pairs the
    device is opened with ``IFF_MULTI_QUEUE``, one fd per pair.

    The device is not configured here (addresses, up/down, namespace): do
    that with ``ip``; a new device disappears when the link closes.

    Args:
        name: the interface name (at most 15 bytes).
        path: the tun control device.
    """

    def __init__(self, name: str, *, path: str = "/dev/net/tun") -> None:
        encoded = name.encode()
        if not 0 < len(encoded) < _IFNAMSIZ or b"/" in encoded or b"\0" in encoded:
            raise ValueError(f"{name!r} is not a valid interface name")
        self.name = name
        self._path = path
        self._fds: list[int] = []
        self._bounce: list[bytearray] = []
        self._views: list[memoryview] = []
        self.tx_dropped = 0
        """Frames from the guest the TAP device refused (queue full, down)."""

    def attach(self, queue_pairs: int, deliver: Deliver) -> None:
        del deliver
        if self._fds:
            raise DeviceError(f"TAP link {self.name} is already attached")
        flags = _IFF_TAP | _IFF_NO_PI
        if queue_pairs > 1:
            flags |= _IFF_MULTI_QUEUE
        request = struct.pack(f"{_IFNAMSIZ}sH22x", self.name.encode(), flags)
        try:
            for _ in range(queue_pairs):
                fd = os.open(self._path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(fd)
                fcntl.ioctl(fd, _TUNSETIFF, request)
        except OSError as exc:
            self.close()
            raise DeviceError(
                f"cannot open TAP device {self.name} ({queue_pairs} queue(s)) "
                f"through {self._path}: {exc.strerror or exc}"
            ) from exc
        self._bounce = [bytearray(_MAX_FRAME) for _ in range(queue_pairs)]
        self._views = [memoryview(b) for b in self._bounce]

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        self._bounce = []
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def fileno(self, pair: int) -> int | None:
        return self._fds[pair]

    def transmit(
        self, pair: int, frames: Sequence[DescriptorChain], header_size: int
    ) -> int:
        fd = self._fds[pair]
        for chain in frames:
            pieces = frame_pieces(chain, header_size)
            if not pieces:
                continue
            try:
                os.writev(fd, pieces)
            except OSError as exc:
                # Full queue, interface down, bad frame: dropped, as a NIC
                # drops; the guest's buffers are returned all the same.
                if exc.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL):
                    raise
                self.tx_dropped += 1
        return len(frames)

    def receive(self, pair: int) -> bytes | bytearray | memoryview | None:
        view = self._views[pair]
        try:
            n = os.readv(self._fds[pair], [view])
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADFD):  # down, or detached
                return None
            raise
        return view[:n] if n else None
