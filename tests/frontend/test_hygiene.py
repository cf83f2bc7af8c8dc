"""The frontend package's public list: every name resolves, has a
docstring, and every public class is final."""

from __future__ import annotations

import enum
import inspect

import vubackend.frontend as package
import vubackend.frontend.testing as testing


def test_all_names_resolve_and_are_documented() -> None:
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
    for name in testing.__all__:
        assert getattr(testing, name) is not None


def test_public_classes_are_final() -> None:
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) and not issubclass(obj, enum.Enum):
            assert getattr(obj, "__final__", False), f"{name} is not @final"
