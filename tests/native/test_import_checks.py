"""The facade refuses a missing or mismatched compiled helper at import.

Each case runs in a fresh interpreter with a fake ``vubackend._native._atomics``
planted in ``sys.modules``, so the real import state of this process is never
touched.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PLANT = """
import sys, types
from vubackend.errors import NativeHelperError
fake = {fake}
sys.modules["vubackend._native._atomics"] = fake
try:
    import vubackend._native
except NativeHelperError as exc:
    print("NativeHelperError:", exc)
else:
    print("imported")
"""


def _run(fake: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PLANT.format(fake=fake)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(
    ("fake", "words"),
    [
        ("None", "missing or cannot be loaded"),
        (
            "types.SimpleNamespace(ffi=None, lib=types.SimpleNamespace())",
            "no VU_NATIVE_ABI",
        ),
        (
            "types.SimpleNamespace(ffi=None, "
            "lib=types.SimpleNamespace(VU_NATIVE_ABI=1))",
            "has ABI 1, this vubackend needs ABI 5",
        ),
        (
            "types.SimpleNamespace(ffi=None, "
            "lib=types.SimpleNamespace(VU_NATIVE_ABI=5, vu_copy=len))",
            "lacks vu_chain_copy, vu_chain_file_io, vu_chain_write",
        ),
    ],
)
def test_bad_helper_raises_native_helper_error(fake: str, words: str) -> None:
    out = _run(fake)
    assert out.startswith("NativeHelperError:"), out
    assert words in out
    assert "pip install ." in out


def test_real_helper_imports() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import vubackend._native as n; print(n.AtomicView)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "AtomicView" in proc.stdout
