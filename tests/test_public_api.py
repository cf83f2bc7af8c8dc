"""Hygiene of the public API of every layer (docs/style.md §6.3, §6.11):
each exported name resolves and is documented, public methods too; concrete
public classes are @final where the layer promises it; modules are private
and stay under 800 lines."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = [
    "vubackend.protocol",
    "vubackend.bitmap",
    "vubackend.memory",
    "vubackend.vring",
    "vubackend.daemon",
    "vubackend.frontend",
    "vubackend.devices",
]
# Layers whose every concrete public class is final (protocol payloads have
# subclasses by design; daemon and frontend export base classes to extend).
FINAL_LAYERS = ["vubackend.bitmap", "vubackend.memory", "vubackend.vring"]


def package(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", PACKAGES)
def test_exports_resolve_and_are_documented(name: str) -> None:
    module = package(name)
    for export in module.__all__:
        item = getattr(module, export)
        if inspect.isclass(item) or inspect.isfunction(item):
            assert inspect.getdoc(item), f"{name}.{export} has no docstring"


@pytest.mark.parametrize("name", FINAL_LAYERS)
def test_public_methods_are_documented(name: str) -> None:
    module = package(name)
    for export in module.__all__:
        item = getattr(module, export)
        if not inspect.isclass(item):
            continue
        for attr, member in vars(item).items():
            public = not attr.startswith("_")
            if public and (
                callable(member) or isinstance(member, property | classmethod)
            ):
                assert inspect.getdoc(member), (
                    f"{name}.{export}.{attr} has no docstring"
                )


@pytest.mark.parametrize("name", FINAL_LAYERS)
def test_concrete_public_classes_are_final(name: str) -> None:
    module = package(name)
    for export in module.__all__:
        item = getattr(module, export)
        if not inspect.isclass(item) or getattr(item, "_is_protocol", False):
            continue  # roles (Protocols) are meant to be implemented
        if issubclass(item, tuple):
            continue  # NamedTuples
        assert getattr(item, "__final__", False), f"{name}.{export} is not @final"


@pytest.mark.parametrize("name", PACKAGES)
def test_modules_are_private_and_small(name: str) -> None:
    directory = Path(package(name).__file__ or "").parent
    for path in directory.glob("*.py"):
        if path.name not in ("__init__.py", "testing.py"):
            assert path.name.startswith("_"), f"{path} is a public module"
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines < 800, f"{path} has {lines} lines"
