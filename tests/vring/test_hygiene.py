"""The vring package's public list: every name resolves, public classes and
functions are documented (public methods too), concrete classes are final,
and modules stay under the size limit."""

from __future__ import annotations

import inspect
from pathlib import Path

import vubackend.vring as package

PACKAGE_DIR = Path(package.__file__).parent


def public_objects() -> list[tuple[str, object]]:
    return [(name, getattr(package, name)) for name in package.__all__]


def test_all_names_resolve_and_are_documented() -> None:
    for name, obj in public_objects():
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert member.__doc__, f"{name}.{attr} has no docstring"


def test_concrete_public_classes_are_final() -> None:
    for name, obj in public_objects():
        if not inspect.isclass(obj) or getattr(obj, "_is_protocol", False):
            continue  # VringT is a role
        if issubclass(obj, tuple):
            continue  # ChainSegment is a NamedTuple
        assert getattr(obj, "__final__", False), f"{name} is not @final"


def test_modules_are_private_and_small() -> None:
    for path in PACKAGE_DIR.glob("*.py"):
        if path.name != "__init__.py":
            assert path.name.startswith("_"), path.name
        lines = path.read_text(encoding="utf-8").count("\n")
        assert lines < 800, f"{path.name} has {lines} lines"


def test_ordering_essays_cite_the_spec() -> None:
    for name in ("_split.py", "_packed.py"):
        text = (PACKAGE_DIR / name).read_text(encoding="utf-8")
        assert "Memory ordering" in text
        assert "§5.4" in text
        assert "rule 4" in text
