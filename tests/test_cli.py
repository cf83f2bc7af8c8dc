"""The ``vubackend`` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vubackend.cli import main
from vubackend.protocol import BackendReq, FrontendReq


def test_protocol_table_lists_every_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protocol"]) == 0
    out = capsys.readouterr().out
    for request in [*FrontendReq, *BackendReq]:
        assert f" {request.name} " in out


def test_demo_runs_a_real_exchange() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vubackend.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "negotiated virtio features" in result.stderr
    assert "guest memory now 1 region(s)" in result.stderr
    assert "(split ring): request 7 ->" in result.stderr
    assert "(packed ring): request 7 ->" in result.stderr
    assert "the daemon served 512 random bytes" in result.stdout
