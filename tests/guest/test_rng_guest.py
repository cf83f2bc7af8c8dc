"""A Linux guest (QEMU 7.2, the kernel's virtio-rng driver) reading
/dev/hwrng through ``vubackend rng``."""

from __future__ import annotations

import re
from pathlib import Path

from tests.guest.rig import GuestImage, rng_device, run_guest, vubackend


def test_guest_reads_64_kib_from_hwrng(guest: GuestImage, tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with vubackend(["rng", "--socket", str(sock)], sock, tmp_path / "rng.log") as rng:
        run = run_guest(
            guest, "rng", rng_device(sock), params={"kib": 64}, log=tmp_path / "serial"
        )
        assert rng.stop() == 0
    assert run.results["rng_current"].startswith("virtio_rng")
    assert run.results["rng_bytes"] == str(64 * 1024)
    # Random bytes: almost none are zero and every value shows up.
    assert int(run.results["rng_nonzero"]) > 64 * 1024 * 0.99
    assert int(run.results["rng_distinct"]) == 256
    served = re.search(r"rng served (\d+) bytes", rng.output())
    assert served is not None, rng.output()
    assert int(served.group(1)) >= 64 * 1024
