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
    assert "backend: received SET_MEM_TABLE" in result.stderr
    assert "with 1 fd(s)" in result.stderr
    assert "frontend: reply to GET_VRING_BASE" in result.stderr
    assert "demo finished" in result.stdout
