"""House rules a grep can check, over the whole project (docs/style.md
§6.6, §6.10, §6.11)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = sorted((ROOT / "vubackend").rglob("*.py"))
EVERYTHING = [
    *PACKAGE,
    *sorted((ROOT / "tests").rglob("*.py")),
    *sorted((ROOT / "benchmarks").rglob("*.py")),
    *sorted((ROOT / "stubs").rglob("*.pyi")),
]
# A call of anything named fence_*, *_acquire or *_release.
ORDERED_CALL = re.compile(r"fence_\w*\(|_acquire\(|_release\(")
ROOT_IMPORT = re.compile(r"^\s*(import vubackend\s*$|from vubackend import )")


def test_every_fence_and_acquire_release_call_is_commented() -> None:
    missing = []
    for path in EVERYTHING:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "ORDERED_CALL = " in line or line.lstrip().startswith("def "):
                continue
            if ORDERED_CALL.search(line) and (
                i == 0 or "ORDERING:" not in lines[i - 1]
            ):
                missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert missing == []


def test_private_modules_open_with_their_rules() -> None:
    for path in PACKAGE:
        if path.name.startswith("_") and path.name != "__init__.py":
            first = path.read_text(encoding="utf-8").splitlines()[0]
            assert first.startswith("# "), (
                f"{path.relative_to(ROOT)} opens without a comment"
            )


def test_nothing_inside_the_package_imports_its_root() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{i + 1}"
        for path in PACKAGE
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if ROOT_IMPORT.match(line)
    ]
    assert offenders == []


def test_the_rules_see_the_whole_tree() -> None:
    names = {path.name for path in EVERYTHING}
    assert {"_codec.py", "_guest_memory.py", "_atomics.pyi", "test_codec.py"} <= names
