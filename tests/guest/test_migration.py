"""Live migration of a running guest between two QEMU 7.2 processes
(software emulation, migration over a UNIX socket), each QEMU with its own
``vubackend blk`` on one shared image, while the guest keeps writing and
reading the disk: once pre-copy (the source backend logs what it writes
while LOG_ALL is on), once postcopy (``migrate-start-postcopy``; the
destination backend, ``--postcopy``, faults on pages that have not arrived
and QEMU serves them). The guest checks its data before, during and after;
the image on the host must hold what the guest wrote."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.qmp import QMP, QMPError
from tests.guest.rig import (
    GuestError,
    GuestImage,
    blk_device,
    qemu_command,
    vubackend,
)

MIB = 1 << 20
PARAMS = {"size_mib": 4, "a_mib": 16, "b_mib": 24, "marker_mib": 40}
MARKER = b"MIGRATED"
BOOT_TIMEOUT = 120.0
MIGRATION_TIMEOUT = 120.0
RUN_TIMEOUT = 180.0


@dataclass
class Qemu:
    process: subprocess.Popen[bytes]
    serial: Path
    qmp: QMP | None = None

    def log(self) -> str:
        return self.serial.read_text(errors="replace")

    def results(self) -> list[tuple[str, str]]:
        pairs = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("@@ "):
                key, _, value = line[3:].partition("=")
                pairs.append((key, value))
        return pairs


@contextlib.contextmanager
def qemu(
    guest: GuestImage, socket: Path, tmp_path: Path, name: str, *extra: str
) -> Iterator[Qemu]:
    """A QEMU guest running the "migrate" test on ``socket``'s blk device,
    with a QMP socket; killed at the end if still running."""
    qmp_path = tmp_path / f"{name}.qmp"
    command = qemu_command(
        guest,
        "migrate",
        blk_device(socket),
        params=PARAMS,
        extra=["-qmp", f"unix:{qmp_path},server=on,wait=off", *extra],
    )
    serial = tmp_path / f"{name}.serial"
    with serial.open("wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    vm = Qemu(process, serial)
    try:
        vm.qmp = QMP(qmp_path)
        yield vm
    finally:
        if vm.qmp is not None:
            vm.qmp.close()
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_for(vm: Qemu, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(k == key for k, _ in vm.results()):
        if vm.process.poll() is not None or time.monotonic() > deadline:
            raise GuestError(f"the guest never reported {key}:\n{vm.log()[-4000:]}")
        time.sleep(0.1)


def host_md5(image: Path, offset_mib: int, size_mib: int) -> str:
    with image.open("rb") as f:
        f.seek(offset_mib * MIB)
        return hashlib.md5(f.read(size_mib * MIB)).hexdigest()


@dataclass
class Migration:
    source: dict[str, str]
    destination: dict[str, str]
    source_rounds: int
    early_rounds: int
    postcopy_requests: int
    events: list[str]
    source_log: str
    destination_log: str
    image: Path


def migrate(guest: GuestImage, tmp_path: Path, *, postcopy: bool) -> Migration:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MIB)
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    channel = f"unix:{tmp_path / 'migration.sock'}"
    extra = ["--postcopy"] if postcopy else []
    blk = ["blk", "--image", str(image), *extra]
    caps = [{"capability": "events", "state": True}]
    if postcopy:
        caps.append({"capability": "postcopy-ram", "state": True})
    with contextlib.ExitStack() as stack:
        src_blk = stack.enter_context(
            vubackend([*blk, "--socket", str(src_sock)], src_sock, tmp_path / "src.log")
        )
        dst_blk = stack.enter_context(
            vubackend([*blk, "--socket", str(dst_sock)], dst_sock, tmp_path / "dst.log")
        )
        src = stack.enter_context(qemu(guest, src_sock, tmp_path, "source"))
        wait_for(src, "round", BOOT_TIMEOUT)  # the guest's I/O runs
        dst = stack.enter_context(
            qemu(guest, dst_sock, tmp_path, "destination", "-incoming", "defer")
        )
        assert src.qmp is not None
        assert dst.qmp is not None
        dst.qmp.command("migrate-set-capabilities", capabilities=caps)
        dst.qmp.command("migrate-incoming", uri=channel)
        src.qmp.command("migrate-set-capabilities", capabilities=caps)
        src.qmp.command(
            "migrate-set-parameters",
            # Postcopy: pages keep arriving while the guest runs its I/O on
            # the destination.
            **{"max-bandwidth": 1 << 30, "max-postcopy-bandwidth": 8 << 20},
        )
        src.qmp.command("migrate", uri=channel)
        if postcopy:
            src.qmp.command("migrate-start-postcopy")
        try:
            info = src.qmp.wait_migration(timeout=MIGRATION_TIMEOUT)
        except QMPError as exc:
            raise GuestError(
                f"{exc}\nsource backend:\n{src_blk.output()[-3000:]}\n"
                f"destination backend:\n{dst_blk.output()[-3000:]}\n"
                f"destination:\n{dst.log()[-3000:]}"
            ) from exc
        source_rounds = sum(1 for k, _ in src.results() if k == "round")
        # Rounds the destination ran before the last page arrived.
        early_rounds = sum(1 for k, _ in dst.results() if k == "round")
        requested = int(info.get("ram", {}).get("postcopy-requests", 0))
        events = [
            str(e.get("data", {}).get("status"))
            for e in src.qmp.events
            if e.get("event") == "MIGRATION"
        ]
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while dst.qmp.command("query-status").get("status") != "running":
            assert time.monotonic() < deadline, "the destination does not run"
            time.sleep(0.1)
        src.qmp.command("quit")
        src.process.wait(timeout=30)
        # Let the guest show a round on the destination first: told at once,
        # it can stop there before printing one (the check below wants one).
        while not any(k == "round" for k, _ in dst.results()):
            assert time.monotonic() < deadline, "no round on the destination"
            time.sleep(0.1)
        # The migration is done: tell the guest, through the disk.
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, MARKER, PARAMS["marker_mib"] * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            dst.process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"the guest did not finish:\n{dst.log()[-4000:]}"
            ) from None
        assert src_blk.stop() == 0
        assert dst_blk.stop() == 0
    return Migration(
        source=dict(src.results()),
        destination=dict(dst.results()),
        source_rounds=source_rounds,
        early_rounds=early_rounds,
        postcopy_requests=requested,
        events=events,
        source_log=src_blk.output(),
        destination_log=dst_blk.output(),
        image=image,
    )


def check_guest_data(run: Migration) -> None:
    src, dst = run.source, run.destination
    assert "FAIL" not in src, src
    assert "FAIL" not in dst, dst
    assert "DONE" in dst, "the guest did not finish on the destination"
    # The guest read and wrote the disk before the migration, and went on
    # on the destination (its round counter continued there).
    assert run.source_rounds >= 1
    assert int(dst["round"]) > int(src["round"])
    assert dst["mismatches"] == "0", "pattern A changed while migrating"
    # Checksums computed before the migration match those after it.
    assert dst["a_final_md5"] == src["a_md5"]
    assert dst["b_readback_md5"] == src["b_md5"]
    # The image on the host holds what the guest wrote.
    size = PARAMS["size_mib"]
    assert host_md5(run.image, PARAMS["a_mib"], size) == src["a_md5"]
    assert host_md5(run.image, PARAMS["b_mib"], size) == src["b_md5"]
    for log in (run.source_log, run.destination_log):
        assert "Traceback" not in log
        assert "SIGTERM received: shutting down" in log


@pytest.mark.slow
def test_precopy_migration_keeps_the_guest_data(
    guest: GuestImage, tmp_path: Path
) -> None:
    run = migrate(guest, tmp_path, postcopy=False)
    check_guest_data(run)
    assert "postcopy-active" not in run.events
    assert run.events[-1] == "completed"
    # QEMU had the source backend log its writes, then stopped it.
    assert "dirty logging on" in run.source_log
    assert "dirty logging off" in run.source_log or "session ended" in run.source_log


@pytest.mark.slow
def test_postcopy_migration_keeps_the_guest_data(
    guest: GuestImage, tmp_path: Path
) -> None:
    run = migrate(guest, tmp_path, postcopy=True)
    check_guest_data(run)
    assert "postcopy-active" in run.events
    assert run.events[-1] == "completed"
    # Pages the destination asked for after it started running, and the
    # guest's disk I/O there before the last page had arrived.
    assert run.postcopy_requests > 0
    assert run.early_rounds >= 1
    # The destination backend took part: userfaultfd handed over, every
    # region registered after QEMU's answer, torn down at POSTCOPY_END.
    log = run.destination_log
    assert "postcopy: userfaultfd" in log
    assert "postcopy: listening" in log
    assert "region(s) registered" in log
    assert "postcopy: ended" in log
