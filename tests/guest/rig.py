"""The QEMU guest rig: a tiny Linux guest under QEMU 7.2 (software
emulation) that runs a named test script and reports on its serial console.

* The kernel is Debian's package, fetched and unpacked once by
  ``scripts/guest.sh`` into ``.cache/guest/kernel`` (or
  ``$VUBACKEND_GUEST_DIR``); :func:`guest_image` runs that script when the
  kernel is missing.
* The initramfs is built here from busybox-static, the kernel's virtio
  modules and ``tests/guest/rootfs`` (``/init`` plus ``/tests/NAME.sh``), and
  cached by content hash. A new guest test is one more ``rootfs/tests/*.sh``
  that prints results with ``result KEY VALUE`` (see ``rootfs/init``).
* :func:`run_guest` boots QEMU with memfd shared memory (as vhost-user
  needs), the given device arguments and ``vutest=NAME``, and returns the
  parsed results; anything wrong fails with the serial log attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTFS = Path(__file__).resolve().parent / "rootfs"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"


@dataclass(frozen=True)
class GuestImage:
    """A kernel and an initramfs that boot the test guest."""

    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class GuestRun:
    """The outcome of one boot: the ``@@ KEY=VALUE`` results, in order of
    appearance (a key reported twice, e.g. across a reboot, keeps its last
    value; :attr:`all_results` keeps every pair), and the serial log."""

    results: dict[str, str]
    all_results: list[tuple[str, str]]
    serial: str
    returncode: int
    seconds: float


class GuestError(AssertionError):
    """The guest did not run its tests to the end; the message carries the
    serial log."""


def guest_dir() -> Path:
    return Path(os.environ.get("VUBACKEND_GUEST_DIR", REPO / ".cache" / "guest"))


def guest_image() -> GuestImage:
    """The kernel (fetched by scripts/guest.sh if needed) and an initramfs
    for the current rootfs, built if its content changed."""
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is missing (Debian qemu-system-x86; run scripts/setup.sh)")
    kdir = guest_dir() / "kernel"
    if not (kdir / "modules.list").is_file():
        subprocess.run(["bash", str(REPO / "scripts" / "guest.sh")], check=True)
    return GuestImage(kdir / "vmlinuz", _initramfs(kdir))


def _initramfs(kdir: Path) -> Path:
    modules = (kdir / "modules.list").read_text().split()
    files = sorted(p for p in ROOTFS.rglob("*") if p.is_file())
    digest = hashlib.sha256((kdir / "version").read_bytes())
    for path in files:
        digest.update(
            str(path.relative_to(ROOTFS)).encode() + b"\0" + path.read_bytes()
        )
    digest.update(" ".join(modules).encode())
    out = guest_dir() / f"initrd-{digest.hexdigest()[:16]}.gz"
    if out.is_file():
        return out
    if not Path(BUSYBOX).is_file() or shutil.which("cpio") is None:
        pytest.fail("busybox-static and cpio are needed (run scripts/setup.sh)")
    stage = out.with_suffix(".d")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
    shutil.copytree(ROOTFS, stage, dirs_exist_ok=True)
    (stage / "init").chmod(0o755)
    (stage / "lib" / "modules").mkdir(parents=True)
    for name in modules:
        shutil.copy2(kdir / "modules" / name, stage / "lib" / "modules" / name)
    (stage / "lib" / "modules" / "modules.list").write_text("\n".join(modules) + "\n")
    names = subprocess.run(
        ["find", "."], cwd=stage, check=True, capture_output=True
    ).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=stage,
        input=names,
        check=True,
        capture_output=True,
    ).stdout
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(
        subprocess.run(
            ["gzip", "-1"], input=archive, check=True, capture_output=True
        ).stdout
    )
    tmp.rename(out)
    shutil.rmtree(stage)
    return out


def qemu_command(
    image: GuestImage,
    tests: str,
    devices: Sequence[str],
    *,
    params: Mapping[str, object] | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    reboot: bool = False,
    extra: Sequence[str] = (),
    wrapper: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line of a guest run (see :func:`run_guest`)."""
    append = ["console=ttyS0", "quiet", "panic=-1", f"vutest={tests}"]
    append += [f"vu.{key}={value}" for key, value in (params or {}).items()]
    command = [
        *wrapper,
        QEMU,
        "-accel", "tcg",
        "-m", f"{memory_mib}M",
        "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio",
        "-monitor", "none",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-numa", "node,memdev=mem",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(append),
    ]  # fmt: skip
    if not reboot:
        command.append("-no-reboot")
    return command + list(devices) + list(extra)


def run_guest(
    image: GuestImage,
    tests: str,
    devices: Sequence[str],
    *,
    params: Mapping[str, object] | None = None,
    log: Path,
    timeout: float = 120.0,
    memory_mib: int = 256,
    cpus: int = 1,
    reboot: bool = False,
    expect_done: bool = True,
    wrapper: Sequence[str] = (),
) -> GuestRun:
    """Boot the guest, run ``tests`` (comma-separated names of
    ``rootfs/tests/*.sh``) and power off.

    Args:
        image: from :func:`guest_image`.
        tests: the test names.
        devices: QEMU arguments adding the devices (chardev + device).
        params: ``vu.KEY=VALUE`` parameters for the scripts.
        log: where the serial output is written.
        timeout: seconds before QEMU is killed.
        cpus: guest CPUs (Linux uses at most one blk-mq queue per CPU).
        reboot: let a guest reboot reset the machine instead of ending QEMU.
        expect_done: fail unless every test ran and nothing failed.
        wrapper: a command QEMU runs under (``["taskset", "-c", "1"]``).

    Raises:
        GuestError: QEMU failed, timed out, or a test reported a failure.
    """
    command = qemu_command(
        image,
        tests,
        devices,
        params=params,
        memory_mib=memory_mib,
        cpus=cpus,
        reboot=reboot,
        wrapper=wrapper,
    )
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise GuestError(
                f"the guest did not finish within {timeout} s; serial log:\n"
                + _tail(log)
            ) from None
    serial = log.read_text(errors="replace")
    pairs: list[tuple[str, str]] = []
    for line in serial.splitlines():
        line = line.strip()
        if line.startswith("@@ "):
            key, _, value = line[3:].partition("=")
            pairs.append((key, value))
    run = GuestRun(dict(pairs), pairs, serial, returncode, time.monotonic() - start)
    failures = [value for key, value in pairs if key == "FAIL"]
    if expect_done and (failures or "DONE" not in run.results or returncode != 0):
        reason = "; ".join(failures) or f"QEMU exited with {returncode}"
        if "DONE" not in run.results:
            reason += " (the guest did not reach the end of its tests)"
        raise GuestError(
            f"{reason}\ncommand: {' '.join(command)}\nserial log:\n{_tail(log)}"
        )
    return run


def _tail(log: Path, lines: int = 80) -> str:
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def blk_device(socket: Path, *, queues: int = 1, chardev: str = "blk0") -> list[str]:
    """QEMU arguments for a vhost-user-blk-pci device on ``socket``."""
    return [
        "-chardev", f"socket,id={chardev},path={socket}",
        "-device", f"vhost-user-blk-pci,chardev={chardev},num-queues={queues}",
    ]  # fmt: skip


def rng_device(socket: Path, *, chardev: str = "rng0") -> list[str]:
    """QEMU arguments for a vhost-user-rng-pci device on ``socket``."""
    return [
        "-chardev", f"socket,id={chardev},path={socket}",
        "-device", f"vhost-user-rng-pci,chardev={chardev}",
    ]  # fmt: skip


@dataclass
class Backend:
    """A ``vubackend`` command running as its own process."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the command and wait for it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise GuestError(
                    f"vubackend ignored {signal.Signals(sig).name}:\n{self.output()}"
                ) from None
        return self.process.returncode


def vubackend_command(*args: str) -> list[str]:
    """The ``vubackend`` command line (the module, so the test's Python and
    its installed vubackend are the ones run)."""
    return [sys.executable, "-m", "vubackend.cli", *args]


@contextlib.contextmanager
def vubackend(
    args: Sequence[str],
    socket: Path,
    log: Path,
    *,
    wait_socket: bool = True,
    wrapper: Sequence[str] = (),
) -> Iterator[Backend]:
    """Run ``vubackend ARGS`` (which should serve on ``socket``) until the
    block ends, under ``wrapper`` if given (``["taskset", "-c", "0"]``);
    fails with its output if it dies or never listens."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*wrapper, *vubackend_command(*args)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    backend = Backend(process, socket, log)
    try:
        deadline = time.monotonic() + 20
        while wait_socket and not socket.is_socket():
            if process.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"vubackend did not start:\n{backend.output()}")
            time.sleep(0.05)
        yield backend
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
