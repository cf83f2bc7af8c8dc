"""The ``vubackend`` command, run as a user runs it: its own process, its
exit status, what it prints."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vubackend.cli import main
from vubackend.frontend import BlkDriver, Frontend
from vubackend.protocol import BackendReq, FrontendReq, VirtioFeatures

COMMAND = [sys.executable, "-m", "vubackend.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.is_socket():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the socket never appeared"
        time.sleep(0.05)


def image(tmp_path: Path, size: int = 1 << 20) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_protocol_table_lists_every_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["protocol"]) == 0
    out = capsys.readouterr().out
    for request in [*FrontendReq, *BackendReq]:
        assert f" {request.name} " in out


def test_demo_serves_a_disk_and_verifies_it() -> None:
    result = run("demo", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for layout in ("split", "packed"):
        assert f"({layout} ring): 4 x 256 KiB written, read back and found" in out
        assert f"({layout} ring): 4 KiB reads at queue depth 16:" in out
    assert "demo: verified 2048 KiB written, read back and found on disk" in out
    assert "negotiated virtio features" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "vubackend"
    if not script.exists():  # pragma: no cover - depends on the install
        pytest.skip("vubackend is not installed as a console script here")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("blk", "rng", "demo", "protocol"):
        assert command in result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_missing_image(tmp_path: Path) -> None:
    result = run(
        "blk", "--socket", str(tmp_path / "s"), "--image", str(tmp_path / "no")
    )
    one_line_error(result, "cannot open the image", "No such file or directory")


def test_image_too_small(tmp_path: Path) -> None:
    small = image(tmp_path, 100)
    result = run("blk", "--socket", str(tmp_path / "s"), "--image", str(small))
    one_line_error(result, "holds 100 bytes, less than one 512-byte block")


@pytest.mark.parametrize("where", ["missing-dir", "regular-file"])
def test_socket_path_that_cannot_be_used(tmp_path: Path, where: str) -> None:
    if where == "missing-dir":
        path = tmp_path / "no" / "such" / "dir" / "blk.sock"
        expected = "cannot listen on"
    else:
        path = tmp_path / "notes.txt"
        path.write_text("keep me")
        expected = "exists and is not a socket"
    result = run("blk", "--socket", str(path), "--image", str(image(tmp_path)))
    one_line_error(result, expected)
    if where == "regular-file":
        assert path.read_text() == "keep me"


def test_socket_already_in_use(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        result = run("blk", "--socket", str(path), "--image", str(image(tmp_path)))
    one_line_error(result, "is in use by a running process")


def test_xen_with_postcopy_is_refused(tmp_path: Path) -> None:
    result = run("rng", "--socket", str(tmp_path / "s"), "--xen", "--postcopy")
    one_line_error(result, "--xen and --postcopy exclude each other")


def test_bad_arguments_get_usage_not_traceback(tmp_path: Path) -> None:
    result = run(
        "blk", "--socket", str(tmp_path / "s"), "--image", "x", "--queues", "many"
    )
    assert result.returncode == 2
    assert "invalid int value" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("blk", "--image", "x")
    assert result.returncode == 2
    assert "--socket" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_blk_serves_then_stops_cleanly_on_a_signal(tmp_path: Path, sig: int) -> None:
    disk = image(tmp_path, 4 << 20)
    sock = tmp_path / "blk.sock"
    process = start("blk", "--socket", str(sock), "--image", str(disk))
    try:
        wait_for_socket(sock, process)
        with Frontend.connect(sock, timeout=10.0) as fe:
            fe.handshake(int(VirtioFeatures.VERSION_1) | (1 << 9))
            fe.create_memory([1 << 20])
            blk = BlkDriver(fe, fe.setup_queue(0, 32))
            fe.start_device()
            blk.write(3, b"q" * 512)
            blk.flush()
        process.send_signal(sig)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    with disk.open("rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == b"q" * 512
    assert "serving virtio-blk" in output
    assert "4 MiB (8192 sectors), read-write" in output
    assert "virtio-blk features negotiated: " in output
    assert "negotiated protocol features" in output
    assert f"{signal.Signals(sig).name} received: shutting down" in output
    assert "blk served 0 reads (0 MiB), 1 writes" in output
    counters = re.search(r"blk: ring 0: (\d+) kicks, (\d+) calls", output)
    assert counters is not None, output
    assert int(counters.group(2)) >= 2, "the write and the flush completed"
    assert "Traceback" not in output
    assert not sock.exists(), "the socket file is removed on exit"


def test_client_mode_reconnects_to_a_restarted_frontend(tmp_path: Path) -> None:
    disk = image(tmp_path, 1 << 20)
    sock = tmp_path / "front.sock"
    process = start("blk", "--socket", str(sock), "--image", str(disk), "--client")
    try:
        for round_ in range(2):
            with Frontend.listen(sock, accept_timeout=20.0, timeout=10.0) as fe:
                fe.handshake(int(VirtioFeatures.VERSION_1))
                fe.create_memory([1 << 20])
                blk = BlkDriver(fe, fe.setup_queue(0, 32))
                fe.start_device()
                blk.write(round_, bytes([65 + round_]) * 512)
                assert blk.read(round_) == bytes([65 + round_]) * 512
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert output.count("connected to the front-end") == 2
    assert "frontend gone; reconnecting" in output
