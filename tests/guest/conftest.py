"""Fixtures of the QEMU guest tests (see rig.py)."""

from __future__ import annotations

import pytest

from tests.guest.rig import GuestImage, guest_image


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The guest kernel and initramfs, built once per session."""
    return guest_image()
