"""House rules a grep can check, over the bitmap and memory layers, their
tests and their benchmark (docs/style.md §6.6, §6.10)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "vubackend/bitmap", ROOT / "vubackend/memory"]
FILES = [
    *(path for package in PACKAGES for path in sorted(package.glob("*.py"))),
    *sorted((ROOT / "tests/bitmap").glob("*.py")),
    *sorted((ROOT / "tests/memory").glob("*.py")),
    ROOT / "benchmarks/bench_memory.py",
]
# As strict as CI's: a call of anything named fence_*, *_acquire, *_release.
ORDERED_CALL = re.compile(r"fence_\w*\(|_acquire\(|_release\(")
ROOT_IMPORT = re.compile(r"^\s*(import vubackend\s*$|from vubackend import )")


def test_every_fence_and_acquire_release_call_is_commented() -> None:
    missing = []
    for path in FILES:
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
    for package in PACKAGES:
        for path in package.glob("_*.py"):
            if path.name == "__init__.py":
                continue
            first = path.read_text(encoding="utf-8").splitlines()[0]
            assert first.startswith("# "), f"{path.name} opens without a comment"


def test_nothing_imports_the_package_root() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{i + 1}"
        for path in FILES
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if ROOT_IMPORT.match(line)
    ]
    assert offenders == []


def test_files_exist() -> None:
    assert all(path.is_file() for path in FILES)
    assert len(FILES) > 20
