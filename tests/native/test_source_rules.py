"""House rules that a grep can check, applied to the native layer's files.

docs/style.md §6.6: every line that calls a fence or an acquire/release
primitive follows a line containing ``ORDERING:``. Checked here over the
facade, the stub, these tests and the benchmark, with a pattern at least as
strict as CI's: any call of a name that starts with ``fence_`` or ends with
``_acquire`` or ``_release`` (definitions are not calls).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    *sorted((ROOT / "vubackend/_native").glob("*.py")),
    ROOT / "stubs/vubackend/_native/_atomics.pyi",
    *sorted((ROOT / "tests/native").glob("*.py")),
    *sorted((ROOT / "benchmarks").glob("bench_native.py")),
]
CALL = re.compile(r"fence_\w*\(|_acquire\(|_release\(")


def test_every_ordering_call_is_commented() -> None:
    missing: list[str] = []
    for path in FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if path.name == "test_source_rules.py" and "CALL = " in line:
                continue
            if line.lstrip().startswith("def "):
                continue
            if CALL.search(line) and (i == 0 or "ORDERING:" not in lines[i - 1]):
                missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not missing, "\n".join(missing)


def test_files_exist() -> None:
    assert all(p.is_file() for p in FILES)
    assert len(FILES) >= 6
