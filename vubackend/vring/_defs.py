# Ring layouts, flags, limits and the event-index arithmetic of virtqueues.
#
# Rules of this module:
# - Declarations only: numbers from the virtio 1.x specification and
#   docs/reference/vhost-user-protocol.md §5, each with its origin. No I/O,
#   no state.
# - Feature bits are local constants: the vring layer may not import the
#   protocol layer (same level, independent). The daemon translates acked
#   features into a QueueFeatures (see from_virtio_features).
# - All index arithmetic is u16 and wraps; helpers mask with 0xFFFF.

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from vubackend.errors import RingStateError

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_SEGMENTS",
    "MAX_INDIRECT_DESCRIPTORS",
    "MAX_QUEUE_SIZE",
    "QueueFeatures",
    "need_event",
]

# ---------------------------------------------------------------- features
# Virtio feature bit numbers (virtio 1.x §6; vhost-user-protocol.md §3.2).
FEATURE_INDIRECT_DESC: Final = 28
FEATURE_EVENT_IDX: Final = 29
FEATURE_RING_PACKED: Final = 34
FEATURE_IN_ORDER: Final = 35

# ---------------------------------------------------------------- descriptors
# Split descriptor {le64 addr; le32 len; le16 flags; le16 next} and packed
# descriptor {le64 addr; le32 len; le16 id; le16 flags}: both 16 bytes.
DESC_SIZE: Final = 16
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
# Packed only (virtio 1.x §2.8.1).
DESC_F_AVAIL: Final = 1 << 7
DESC_F_USED: Final = 1 << 15

# ---------------------------------------------------------------- split rings
# Available ring {le16 flags; le16 idx; le16 ring[N]; le16 used_event}.
AVAIL_F_NO_INTERRUPT: Final = 1
# Used ring {le16 flags; le16 idx; {le32 id; le32 len} ring[N]; le16 avail_event}.
USED_F_NO_NOTIFY: Final = 1
RING_HEADER: Final = 4
AVAIL_ELEM: Final = 2
USED_ELEM: Final = 8
EVENT_FIELD: Final = 2
# Alignments of the three parts (virtio 1.x §2.7, table "Virtqueue Part Alignment").
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

# ---------------------------------------------------------------- packed rings
# Event suppression structure {le16 off_wrap; le16 flags} (virtio 1.x §2.8.10).
EVENT_SUPPRESSION_SIZE: Final = 4
EVENT_SUPPRESSION_ALIGN: Final = 4
RING_EVENT_FLAGS_ENABLE: Final = 0
RING_EVENT_FLAGS_DISABLE: Final = 1
RING_EVENT_FLAGS_DESC: Final = 2
# GET/SET_VRING_BASE for packed rings: last_avail_idx | avail_wrap << 15 |
# used_idx << 16 | used_wrap << 31 (vhost-user-protocol.md §5.2).
PACKED_WRAP_BIT: Final = 15

# ---------------------------------------------------------------- limits
# Largest queue: a 16-bit free-running index must tell full from empty
# (virtio 1.x §2.7; DPDK and virtio-queue enforce it; §5.5 of the reference).
MAX_QUEUE_SIZE: Final = 32768
# Most entries an indirect table may hold. virtio-queue allows len/16 up to
# 65535, libvhost-user 1024; we take the largest queue size, so that a hop
# counter bounded by it fits in a u16 and no table walk exceeds 32768 steps.
MAX_INDIRECT_DESCRIPTORS: Final = 32768
# Most buffer pieces one chain may produce (a descriptor that spans k memory
# regions counts k). DPDK caps a chain at 256 vectors (BUF_VECTOR_MAX),
# libvhost-user at 1024 (VIRTQUEUE_MAX_SIZE); 4096 leaves room for the
# largest legitimate requests (virtio-blk seg_max is queue size - 2).
MAX_CHAIN_SEGMENTS: Final = 4096
# Largest total length of one chain: it must fit a u32 (virtio 1.x §2.7.5
# and §2.8.6, "total length ... 2^32"; used.len is a le32).
MAX_CHAIN_BYTES: Final = 0xFFFF_FFFF


def need_event(event: int, new: int, old: int) -> bool:
    """The event-index test of virtio 1.x §2.7.10 (Linux ``vring_need_event``).

    True when ``event`` lies in the window of indices ``[old, new)`` that
    moved since the last notification, all in wrapping u16 arithmetic:
    ``(u16)(new - event - 1) < (u16)(new - old)``.

    Args:
        event: the other side's event index (``used_event``, ``avail_event``,
            or a packed event offset).
        new: the index now.
        old: the index at the last notification.

    Returns:
        Whether to notify.
    """
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@final
@dataclass(frozen=True, slots=True)
class QueueFeatures:
    """The negotiated virtio features that change how a ring works.

    Attributes:
        event_idx: VIRTIO_F_EVENT_IDX (bit 29): ``used_event``/``avail_event``
            (split) or the DESC mode of event suppression (packed).
        packed: VIRTIO_F_RING_PACKED (bit 34): the packed ring layout.
        in_order: VIRTIO_F_IN_ORDER (bit 35): buffers are used in the order
            they were made available; a packed ring may then complete a
            batch with one used descriptor.
        indirect: VIRTIO_F_INDIRECT_DESC (bit 28): indirect descriptor tables
            are allowed.
    """

    event_idx: bool = False
    packed: bool = False
    in_order: bool = False
    indirect: bool = False

    @classmethod
    def from_virtio_features(cls, features: int) -> QueueFeatures:
        """Pick the ring-related bits out of a virtio feature word.

        Args:
            features: the acked virtio features (``SET_FEATURES``).

        Returns:
            The ring features they enable.
        """
        return cls(
            event_idx=bool(features >> FEATURE_EVENT_IDX & 1),
            packed=bool(features >> FEATURE_RING_PACKED & 1),
            in_order=bool(features >> FEATURE_IN_ORDER & 1),
            indirect=bool(features >> FEATURE_INDIRECT_DESC & 1),
        )


def split_ring_sizes(size: int, event_idx: bool) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) of a split
    ring of ``size`` entries; EVENT_IDX adds the 2-byte event field to the
    available and used rings (vhost-user-protocol.md §5.1, §7.4 item 6)."""
    extra = EVENT_FIELD if event_idx else 0
    return (
        DESC_SIZE * size,
        RING_HEADER + AVAIL_ELEM * size + extra,
        RING_HEADER + USED_ELEM * size + extra,
    )


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor ring, driver event suppression, device event
    suppression) of a packed ring of ``size`` entries (§5.2)."""
    return DESC_SIZE * size, EVENT_SUPPRESSION_SIZE, EVENT_SUPPRESSION_SIZE


# ---------------------------------------------------------------- configuration


def check_split_config(size: int, desc: int, avail: int, used: int) -> None:
    """The configuration rules of a split ring (virtio 1.x §2.7; §7.4 item 4).

    Raises:
        RingStateError: the size is not a power of two in 1..32768, or an
            address is misaligned or not a u64.
    """
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise RingStateError(
            f"split queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}"
        )
    for what, gpa, align in (
        ("descriptor table", desc, DESC_ALIGN),
        ("available ring", avail, AVAIL_ALIGN),
        ("used ring", used, USED_ALIGN),
    ):
        if not 0 <= gpa < 1 << 64:
            raise RingStateError(f"{what} address {gpa:#x} is not a u64")
        if gpa % align:
            raise RingStateError(f"{what} address {gpa:#x} is not {align}-byte aligned")


def check_packed_config(size: int, desc: int, driver: int, device: int) -> None:
    """The configuration rules of a packed ring (virtio 1.x §2.8; §7.4 item 4).

    Raises:
        RingStateError: the size is not in 1..32768, or an address is
            misaligned or not a u64.
    """
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise RingStateError(f"packed queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    for what, gpa, align in (
        ("descriptor ring", desc, DESC_ALIGN),
        ("driver event suppression area", driver, EVENT_SUPPRESSION_ALIGN),
        ("device event suppression area", device, EVENT_SUPPRESSION_ALIGN),
    ):
        if not 0 <= gpa < 1 << 64:
            raise RingStateError(f"{what} address {gpa:#x} is not a u64")
        if gpa % align:
            raise RingStateError(f"{what} address {gpa:#x} is not {align}-byte aligned")
