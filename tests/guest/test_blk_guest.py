"""A Linux guest (QEMU 7.2, software emulation, the kernel's virtio-blk
driver) on ``vubackend blk``, with qemu-storage-daemon on the same image as
the reference run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.guest.rig import GuestImage, blk_device, run_guest, vubackend
from tests.interop.peers import storage_daemon

MIB = 1 << 20


def host_md5(image: Path, offset_mib: int, size_mib: int) -> str:
    with image.open("rb") as f:
        f.seek(offset_mib * MIB)
        return hashlib.md5(f.read(size_mib * MIB)).hexdigest()


def test_guest_pattern_survives_and_matches_the_reference(
    guest: GuestImage, tmp_path: Path
) -> None:
    # Reference run: qemu-storage-daemon serves a fresh 64 MiB image; the
    # guest writes a random pattern at 16 MiB with O_DIRECT and reads it back.
    with storage_daemon(tmp_path, size_mb=64, num_queues=1, name="ref") as qsd:
        image = qsd.image
        ref = run_guest(
            guest, "blk", blk_device(qsd.socket), log=tmp_path / "ref.serial"
        )
    assert ref.results["write"] == "rc0"
    assert ref.results["readback_md5"] == ref.results["pattern_md5"]
    assert host_md5(image, 16, 8) == ref.results["pattern_md5"]

    # Same guest, same image, now on vubackend: it first reads what the
    # reference wrote, then writes its own pattern at 32 MiB, and discards
    # 1 MiB at 48 MiB.
    sock = tmp_path / "blk.sock"
    args = ["blk", "--socket", str(sock), "--image", str(image)]
    with vubackend(args, sock, tmp_path / "vubackend.log") as backend:
        ours = run_guest(
            guest,
            "blk",
            blk_device(sock),
            params={"offset_mib": 32, "check_mib": 16, "discard_mib": 48},
            log=tmp_path / "ours.serial",
        )
        assert backend.stop() == 0
    log = backend.output()
    assert ours.results["check_md5"] == ref.results["pattern_md5"]
    assert ours.results["write"] == "rc0"
    assert ours.results["readback_md5"] == ours.results["pattern_md5"]
    assert host_md5(image, 32, 8) == ours.results["pattern_md5"]
    assert host_md5(image, 16, 8) == ref.results["pattern_md5"], "left intact"
    assert ours.results["discard"] == "rc0"
    assert host_md5(image, 48, 1) == hashlib.md5(bytes(MIB)).hexdigest()
    # The guest sees the same disk from both backends.
    for key in ("size_sectors", "ro", "hw_queues"):
        assert ours.results[key] == ref.results[key], key
    assert ours.results["serial"] == image.name
    # The command said what it served and what was negotiated.
    assert "serving virtio-blk" in log
    assert "virtio-blk features negotiated" in log
    assert "FLUSH" in log
    assert "SIGTERM received: shutting down" in log
    assert "Traceback" not in log


def test_read_only_multi_queue_disk(guest: GuestImage, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    content = bytes(range(256)) * (4 * MIB // 256)
    image.write_bytes(content)
    sock = tmp_path / "ro.sock"
    args = ["blk", "--socket", str(sock), "--image", str(image)]
    args += ["--read-only", "--queues", "2"]
    with vubackend(args, sock, tmp_path / "vubackend.log") as backend:
        run = run_guest(
            guest,
            "blkro",
            blk_device(sock, queues=2),
            cpus=2,  # Linux uses one queue per CPU at most
            log=tmp_path / "ro.serial",
        )
        assert backend.stop() == 0
    assert run.results["ro"] == "1"
    assert run.results["hw_queues"] == "2"
    assert run.results["write"] == "refused"
    assert run.results["head_md5"] == hashlib.md5(content[:MIB]).hexdigest()
    assert image.read_bytes() == content


def test_file_system_survives_reboot_and_reconnect(
    guest: GuestImage, tmp_path: Path
) -> None:
    image = tmp_path / "fs.img"
    with image.open("wb") as f:
        f.truncate(32 * MIB)
    sock = tmp_path / "fs.sock"
    args = ["blk", "--socket", str(sock), "--image", str(image)]
    with vubackend(args, sock, tmp_path / "vubackend.log") as backend:
        # First QEMU: mke2fs, write a file, reboot the guest (the device is
        # reset and restarted on the same connection), check it.
        first = run_guest(
            guest,
            "fs",
            blk_device(sock),
            reboot=True,
            log=tmp_path / "boot1.serial",
        )
        # Second QEMU process: a new connection to the same backend.
        second = run_guest(guest, "fs", blk_device(sock), log=tmp_path / "boot2.serial")
        assert backend.stop() == 0
    created = first.results["fs_created"]
    assert first.results["fs_verified"] == "yes"
    assert first.results["fs_data_md5"] == created
    assert second.results["fs_verified"] == "yes"
    assert second.results["fs_data_md5"] == created
    assert "fs_created" not in second.results
    assert backend.output().count("front-end connected") == 2
