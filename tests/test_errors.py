"""Hygiene of the error tree (docs/style.md §6.5)."""

from __future__ import annotations

import pytest

from vubackend import errors


def all_error_classes() -> list[type[errors.VhostUserError]]:
    found: list[type[errors.VhostUserError]] = []
    pending: list[type[errors.VhostUserError]] = [errors.VhostUserError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_public_error_is_in_the_tree_and_exported() -> None:
    names = {cls.__name__ for cls in all_error_classes()}
    assert names == set(errors.__all__)


def test_abstract_errors_cannot_be_raised() -> None:
    for cls in (
        errors.VhostUserError,
        errors.ProtocolError,
        errors.GuestMemoryError,
        errors.VringError,
    ):
        with pytest.raises(TypeError, match="is abstract"):
            cls("x")


def test_every_concrete_error_declares_reconnect_itself() -> None:
    for cls in all_error_classes():
        if cls.__dict__.get("_abstract", False):
            continue
        assert "reconnect" in cls.__dict__, cls.__name__
        assert isinstance(cls.__dict__["reconnect"], bool)


def test_structured_attributes() -> None:
    error = errors.RemoteProtocolError(
        "SET_VRING_KICK: expected 1 fd, got 2",
        request=12,
        need_reply=True,
        recoverable=True,
    )
    assert (error.request, error.need_reply, error.recoverable) == (12, True, True)
    assert str(error) == "SET_VRING_KICK: expected 1 fd, got 2"
    unmapped = errors.UnmappedAddressError("no region", address=0x1000, length=8)
    assert (unmapped.address, unmapped.length) == (0x1000, 8)
    assert isinstance(unmapped, errors.GuestMemoryError)
