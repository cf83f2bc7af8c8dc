# Address kinds and limits of the memory layer.
#
# Rules of this module:
# - Addresses are named by address space (docs/style.md §6.2): a GuestAddress
#   is a guest physical address (descriptors, indirect tables, the log), a
#   FrontendAddress is a virtual address in the frontend's process (ring
#   addresses of SET_VRING_ADDR, the regions' userspace_addr). They are
#   NewTypes over int so that mypy rejects a mix-up; at run time they are ints.
# - Limits are named constants with their provenance.

from __future__ import annotations

from typing import Final, NewType

__all__ = ["MAX_MEM_SLOTS", "FrontendAddress", "GuestAddress"]

GuestAddress = NewType("GuestAddress", int)
"""A guest physical address (GPA)."""

FrontendAddress = NewType("FrontendAddress", int)
"""A virtual address in the frontend's process (QEMU's "QVA", the regions'
``userspace_addr``, the ring addresses of ``SET_VRING_ADDR``)."""

# Most regions one GuestMemory may hold. It is the KVM limit of 512 memory
# slots minus the 3 that KVM uses internally: libvhost-user's
# VHOST_USER_MAX_RAM_SLOTS and rust-vmm's MAX_MEM_SLOTS are both 509, and it
# is what we report for CONFIGURE_MEM_SLOTS (QEMU itself caps at 512).
MAX_MEM_SLOTS: Final = 509
