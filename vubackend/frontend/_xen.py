# Xen memory regions from the frontend side (XEN_MMAP, vhost-user-protocol.md
# §4.13): what a Xen frontend (xen-vhost-frontend) sends instead of plain
# memfd regions, for testing backends built on vubackend.memory.XenBackend.
#
# Rules of this module:
# - A XenRegion describes guest RAM by GPA like a RamRegion, but its fd is
#   the Xen device handle the backend maps through (an open privcmd for
#   foreign regions, gntdev for grant regions) and it carries the Xen flags
#   (wire values: NO_ADVANCE_MAP is bit 8) and the domain id. The mmap
#   offset is always 0, as vm-memory requires.
# - The frontend's own view of guest RAM stays its GuestRam (rings and
#   drivers address it by GPA); share_xen_memory() adopts that RAM and sends
#   the Xen regions for it. XEN_MMAP must be negotiated first (the Requests
#   layer then encodes 40-byte regions).
# - Fds are borrowed: the caller keeps and closes the device handles.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from vubackend.errors import LocalProtocolError
from vubackend.protocol import (
    MAX_MEM_REGIONS,
    FrontendReq,
    ProtocolFeatures,
    XenMemoryRegion,
    XenMemoryTable,
    XenMmapFlags,
    XenSingleMemoryRegion,
)

if TYPE_CHECKING:
    from vubackend.frontend._frontend import Frontend
    from vubackend.frontend._memory import GuestRam, RamRegion

__all__ = ["XenRegion", "share_xen_memory", "xen_region"]


@final
@dataclass(frozen=True, slots=True)
class XenRegion:
    """One memory region as a Xen frontend sends it.

    Attributes:
        gpa: guest physical address (bit 63 set for grant addresses).
        size: bytes.
        faddr: the frontend virtual address sent as ``userspace_addr``.
        fd: the Xen device handle (privcmd or gntdev), borrowed.
        flags: FOREIGN or GRANT, optionally with NO_ADVANCE_MAP.
        domid: the guest's domain id (``xen_mmap_data``).
    """

    gpa: int
    size: int
    faddr: int
    fd: int
    flags: XenMmapFlags
    domid: int

    def payload(self) -> XenMemoryRegion:
        """The 40-byte region of the message."""
        return XenMemoryRegion(
            self.gpa, self.size, self.faddr, 0, int(self.flags), self.domid
        )


def xen_region(
    region: RamRegion, fd: int, flags: XenMmapFlags, domid: int
) -> XenRegion:
    """The Xen region covering one region of the frontend's guest RAM.

    Args:
        region: the RAM region (its GPA, size and frontend address are used).
        fd: the Xen device handle to send.
        flags: the Xen mapping flags.
        domid: the domain id.
    """
    return XenRegion(region.gpa, region.size, region.faddr, fd, flags, domid)


def share_xen_memory(
    frontend: Frontend,
    ram: GuestRam,
    regions: Sequence[XenRegion],
    *,
    use_add_mem_reg: bool = False,
) -> None:
    """Adopt ``ram`` as the frontend's guest RAM and send ``regions`` for it
    (SET_MEM_TABLE, or ADD_MEM_REG per region).

    Args:
        frontend: a frontend that negotiated XEN_MMAP.
        ram: the frontend's view of the same guest memory; closed with the
            frontend.
        regions: the Xen regions to send (fds borrowed).
        use_add_mem_reg: one ADD_MEM_REG per region instead of one table.

    Raises:
        LocalProtocolError: XEN_MMAP was not negotiated, or more than 8
            regions for one SET_MEM_TABLE.
    """
    if not frontend.has_protocol_feature(ProtocolFeatures.XEN_MMAP):
        raise LocalProtocolError("Xen regions need XEN_MMAP negotiated")
    if not use_add_mem_reg and len(regions) > MAX_MEM_REGIONS:
        raise LocalProtocolError(
            f"SET_MEM_TABLE carries at most {MAX_MEM_REGIONS} regions"
        )
    # The frontend's RAM slot: what setup_queue() and the drivers allocate in.
    if frontend._ram is not None and frontend._ram is not ram:
        frontend._ram.close()
    frontend._ram = ram
    if use_add_mem_reg:
        for region in regions:
            frontend.request(
                FrontendReq.ADD_MEM_REG,
                XenSingleMemoryRegion(region.payload()),
                fds=[region.fd],
            )
        return
    table = XenMemoryTable(tuple(r.payload() for r in regions))
    frontend.request(FrontendReq.SET_MEM_TABLE, table, fds=[r.fd for r in regions])
