"""``vubackend net``, run as a user runs it: its own process, its exit
status, what it prints."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vubackend.devices import NetFeatures
from vubackend.frontend import Frontend, NetDriver
from vubackend.protocol import VirtioFeatures

COMMAND = [sys.executable, "-m", "vubackend.cli", "net"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loopback", "--queues", "0"], "queue_pairs 0 is not in 1..127"),
        (["--loopback", "--mac", "52:54:zz:00:00:01"], "is not a MAC address"),
        (["--sink", "--mac", "03:00:00:00:00:01"], "is a multicast address"),
        (["--tap", "a-name-that-is-too-long"], "is not a valid interface name"),
    ],
    ids=["queues", "mac", "multicast", "tap-name"],
)
def test_bad_options_get_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("--socket", str(tmp_path / "s"), *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not (tmp_path / "s").exists()


def test_exactly_one_link(tmp_path: Path) -> None:
    sock = str(tmp_path / "s")
    for args in ([], ["--loopback", "--sink"], ["--tap", "t0", "--loopback"]):
        result = run("--socket", sock, *args)
        assert result.returncode == 2, args
        assert "--tap" in result.stderr
        assert "Traceback" not in result.stderr


def test_loopback_serves_then_reports_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    process = subprocess.Popen(
        [*COMMAND, "--loopback", "--socket", str(sock), "--mac", "52:54:00:00:00:07"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.is_socket():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with Frontend.connect(sock, timeout=10.0) as fe:
            fe.handshake(int(VirtioFeatures.VERSION_1 | NetFeatures.MRG_RXBUF))
            fe.create_memory([1 << 20])
            net = NetDriver(fe, fe.setup_queue(0, 32), fe.setup_queue(1, 32))
            fe.start_device()
            net.post_rx_buffers()
            sent = [b"frame %d" % k + bytes(60) for k in range(5)]
            net.send(sent)
            got = net.receive(5)
            mac = fe.get_config(0, 6)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert got == sent
    assert mac == bytes.fromhex("525400000007")
    assert process.returncode == 0, output
    assert "serving virtio-net over a loopback" in output
    assert "net served: tx 5 frames (335 bytes), rx 5 frames (335 bytes)" in output
    assert "net pair 0: tx 5 frames, rx 5 frames" in output
    # Each ring's counters (the rings count them); which ring was kicked
    # depends on when the worker had kicks suppressed, but the session
    # started with one.
    kicks = {int(r): int(k) for r, k in re.findall(r"ring (\d+): (\d+) kicks", output)}
    assert set(kicks) == {0, 1}
    assert sum(kicks.values()) >= 1
    assert "Traceback" not in output
    assert not sock.exists()


def test_generate_goes_with_sink(tmp_path: Path) -> None:
    sock = str(tmp_path / "s")
    for args, message in (
        (["--loopback", "--generate", "64"], "--generate goes with --sink"),
        (["--sink", "--generate", "8"], "a frame is 14 to 65535 bytes"),
    ):
        result = run("--socket", sock, *args)
        assert result.returncode == 1, args
        assert message in result.stderr
        assert "Traceback" not in result.stderr
