"""The vring package's own rules; the API hygiene of every layer is checked
in tests/test_public_api.py."""

from __future__ import annotations

from pathlib import Path

import vubackend.vring as package

PACKAGE_DIR = Path(package.__file__).parent


def test_ordering_essays_cite_the_spec() -> None:
    for name in ("_split.py", "_packed.py"):
        text = (PACKAGE_DIR / name).read_text(encoding="utf-8")
        assert "Memory ordering" in text
        assert "§5.4" in text
        assert "rule 4" in text
