"""net scenarios of ``python -m benchmarks``: DPDK virtio-user (dpdk-testpmd,
C, busy-polling, CPU 1) as the frontend, and on CPU 0 either ``vubackend
net`` or the reference, DPDK's own vhost PMD (also busy-polling).

* tx: virtio-user txonly (64-byte frames) into ``vubackend net --sink``;
  reference vhost PMD rxonly.
* rx: ``vubackend net --sink --generate 64`` into virtio-user rxonly;
  reference vhost PMD txonly.
* loopback: virtio-user io forwarding (started with a burst) through
  ``vubackend net --loopback``; reference vhost PMD io.

Each direction with split and packed rings, queue sizes 256 and 1024.

Mpps is testpmd's own rate between two ``show port stats`` a few seconds
apart; CPU % is the backend process's user+system time over that window;
kicks/s and calls/s come from the counters ``vubackend`` prints when it
stops (over the whole session)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks._harness import Metrics, Scenario
from tests.interop.peers import wait_for_socket

TESTPMD = "dpdk-testpmd"
WARMUP = 2.0
WINDOW = 3.0
_TICK = os.sysconf("SC_CLK_TCK")
_PPS = re.compile(r"(Rx|Tx)-pps:\s+(\d+)")
_RING = re.compile(r"ring \d+: (\d+) kicks, (\d+) calls")


@dataclass(frozen=True)
class NetCase:
    name: str
    frontend_mode: str  # testpmd forwarding mode of virtio-user
    measured: str  # "Tx" or "Rx": the frontend's rate that counts
    ours_link: tuple[str, ...]  # vubackend net link options
    reference_mode: str  # testpmd forwarding mode of the vhost PMD
    packed: bool = False
    queue_size: int = 256


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _frontend(case: NetCase, sock: Path, workdir: Path, backend_pid: int) -> Metrics:
    """Run virtio-user for WARMUP + WINDOW seconds; its rate over WINDOW and
    the backend's CPU over the same window."""
    devargs = f"net_virtio_user0,path={sock},queues=1,queue_size={case.queue_size}"
    if case.packed:
        devargs += ",packed_vq=1"
    command = [
        TESTPMD, "--lcores", "0@1,1@1", "--no-pci", "--no-huge", "-m", "512",
        f"--file-prefix=vub{os.getpid()}", "--vdev", devargs,
        "--", "-i", "--nb-cores=1", "--total-num-mbufs=16384",
        f"--txd={case.queue_size}", f"--rxd={case.queue_size}",
    ]  # fmt: skip
    log = workdir / "virtio-user.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT
        )
    assert process.stdin is not None

    def say(line: str) -> None:
        assert process.stdin is not None
        process.stdin.write(line.encode() + b"\n")
        process.stdin.flush()

    try:
        time.sleep(1.5)  # EAL start and the vhost-user handshake
        say(f"set fwd {case.frontend_mode}")
        say("start tx_first" if case.frontend_mode == "io" else "start")
        time.sleep(WARMUP)
        say("show port stats all")
        cpu0, t0 = _cpu_seconds(backend_pid), time.monotonic()
        time.sleep(WINDOW)
        say("show port stats all")
        cpu1, t1 = _cpu_seconds(backend_pid), time.monotonic()
        time.sleep(0.3)
        say("stop")
        say("quit")
        process.stdin.close()
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(Path("/var/run/dpdk") / f"vub{os.getpid()}", ignore_errors=True)
    rates = [int(v) for k, v in _PPS.findall(log.read_text()) if k == case.measured]
    if len(rates) < 2:
        raise RuntimeError(f"no second rate from testpmd:\n{log.read_text()[-3000:]}")
    return {
        "Mpps": rates[1] / 1e6,
        "backend_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
    }


def _ours(case: NetCase, workdir: Path) -> Metrics:
    sock = workdir / "net.sock"
    log = workdir / "vubackend-net.log"
    command = [
        "taskset", "-c", "0", sys.executable, "-m", "vubackend.cli", "net",
        "--socket", str(sock), "--queue-size", str(max(case.queue_size, 256)),
        *case.ours_link,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_socket(sock, process, log)
        start = time.monotonic()
        metrics = _frontend(case, sock, workdir, process.pid)
        session = time.monotonic() - start
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    kicks = calls = 0
    for k, c in _RING.findall(log.read_text()):
        kicks += int(k)
        calls += int(c)
    metrics["kicks_per_s"] = kicks / session
    metrics["calls_per_s"] = calls / session
    return metrics


def _reference(case: NetCase, workdir: Path) -> Metrics:
    sock = workdir / "vhost.sock"
    sock.unlink(missing_ok=True)
    log = workdir / "vhost-pmd.log"
    command = [
        TESTPMD, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "512",
        f"--file-prefix=vhb{os.getpid()}",
        "--vdev", f"net_vhost0,iface={sock},queues=1",
        "--", "--nb-cores=1", f"--forward-mode={case.reference_mode}",
        "--stats-period", "10", "--total-num-mbufs=16384",
        f"--txd={case.queue_size}", f"--rxd={case.queue_size}",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_socket(sock, process, log)
        return _frontend(case, sock, workdir, process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(Path("/var/run/dpdk") / f"vhb{os.getpid()}", ignore_errors=True)


# direction: (virtio-user's testpmd mode, the rate measured there, our link
# options, the vhost PMD's testpmd mode).
_DIRECTIONS: Final = {
    "tx": ("txonly", "Tx", ("--sink",), "rxonly"),
    "rx": ("rxonly", "Rx", ("--sink", "--generate", "64"), "txonly"),
    "loopback": ("io", "Rx", ("--loopback",), "io"),
}
CASES = [
    NetCase(f"net {d} 64B {'packed' if p else 'split'} q{q}", *_DIRECTIONS[d], p, q)
    for d in _DIRECTIONS
    for p in (False, True)
    for q in (256, 1024)
]


def scenarios(workdir: Path) -> list[Scenario]:
    return [
        Scenario(
            case.name,
            functools.partial(_ours, case, workdir),
            functools.partial(_reference, case, workdir),
            ["Mpps"],
            "DPDK vhost PMD",
            {"backend_cpu_pct": " %", "kicks_per_s": "", "calls_per_s": ""},
        )
        for case in CASES
    ]
