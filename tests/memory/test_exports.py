"""API hygiene of vubackend.memory: exports exist, concrete classes are final,
public items are documented."""

from __future__ import annotations

import inspect

import vubackend.memory as package


def test_every_export_exists_and_is_documented() -> None:
    for name in package.__all__:
        item = getattr(package, name)
        if inspect.isclass(item) or inspect.isfunction(item):
            assert inspect.getdoc(item), f"{name} has no docstring"


def test_concrete_public_classes_are_final() -> None:
    for name in package.__all__:
        item = getattr(package, name)
        if not inspect.isclass(item) or getattr(item, "_is_protocol", False):
            continue
        assert getattr(item, "__final__", False), f"{name} is not @final"


def test_public_methods_are_documented() -> None:
    for name in package.__all__:
        item = getattr(package, name)
        if not inspect.isclass(item):
            continue
        for attr, member in vars(item).items():
            public = not attr.startswith("_")
            if public and (
                callable(member) or isinstance(member, (property, classmethod))
            ):
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"
