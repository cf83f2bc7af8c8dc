# Inflight tracking in the native ring calls (INFLIGHT_SHMFD, split rings):
# a walker bound to a queue's region of the inflight buffer records its pops
# and pushes there itself (native.c, "bound rings"), so a tracked queue pays
# no Python per request for it.
#
# Rules of this module:
# - The region is pinned while bound (the buffer cannot be unmapped under a
#   walk); untrack() unpins it. Whoever binds unbinds before the buffer is
#   closed (the daemon detaches trackers first).
# - The counter lives in the walker while bound: read it back (counter())
#   before recording in Python, and hand the new value over (set_counter())
#   after, so that counters keep increasing whoever records.
# - Calls must not race with the walker's calls (the queue serialises them).

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from vubackend._native import _atomics

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vubackend._native._walker import RingWalker

__all__ = ["counter", "set_counter", "track", "untrack"]

_ffi: Final = _atomics.ffi
# The region: a 16-byte header, then 16 bytes per descriptor state.
_HEADER: Final = 16
_STATE: Final = 16


def track(walker: RingWalker, region: Buffer, descriptors: int, counter: int) -> None:
    """Record the walker's split pops and pushes in ``region`` (a queue's
    region of the inflight buffer, with ``descriptors`` states), counting
    from ``counter``; replaces a previous binding.

    Raises:
        ValueError: a packed walker, the region is shorter than its
            states, or an argument is out of range.
        TypeError: the region is not a writable buffer.
    """
    if walker.packed:
        raise ValueError("inflight tracking in the walker is for split rings")
    if not 0 <= descriptors <= 0xFFFF or not 0 <= counter < 1 << 64:
        raise ValueError(f"{descriptors} descriptors, counter {counter}: out of range")
    try:
        pin = _ffi.from_buffer("uint8_t[]", region, require_writable=True)
    except (BufferError, TypeError) as exc:
        raise TypeError(f"the inflight region must be writable: {exc}") from exc
    if len(pin) < _HEADER + _STATE * descriptors:
        _ffi.release(pin)
        raise ValueError(
            f"an inflight region of {len(pin)} bytes cannot hold "
            f"{descriptors} descriptor states"
        )
    untrack(walker)
    ring = walker._ring[0]
    ring.track_counter = counter
    ring.track_num = descriptors
    ring.track = pin
    walker._track_pin = pin


def untrack(walker: RingWalker) -> None:
    """Stop recording and unpin the region. Idempotent."""
    pin, walker._track_pin = walker._track_pin, None
    if pin is None:
        return
    ring = walker._ring[0]
    ring.track = _ffi.NULL
    ring.track_num = 0
    _ffi.release(pin)


def counter(walker: RingWalker) -> int:
    """The counter the next recorded pop gets."""
    value: int = walker._ring[0].track_counter
    return value


def set_counter(walker: RingWalker, value: int) -> None:
    """Set the counter the next recorded pop gets."""
    walker._ring[0].track_counter = value
