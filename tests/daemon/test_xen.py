"""A daemon on the Xen memory backend, over the fake privcmd/gntdev drivers:
our frontend sends Xen regions (foreign, grant, grant mapped on demand) and
a RAM disk serves block requests out of that memory, rings included. Also
the refusals: Xen regions to a plain daemon, plain regions to a Xen one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from tests.memory._fake_xen import PAGE, FakeXen
from vubackend.daemon import VhostUserDaemon
from vubackend.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    RequestRefusedError,
)
from vubackend.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    BlkDriver,
    Frontend,
    GuestRam,
    share_xen_memory,
    xen_region,
)
from vubackend.memory import (
    XEN_GRANT_ADDR_OFF,
    GuestMemoryAtomic,
    MemoryBackend,
    MmapBackend,
    XenBackend,
)
from vubackend.protocol import (
    FrontendReq,
    MemoryRegion,
    MemoryTable,
    ProtocolFeatures,
    VirtioFeatures,
    XenMmapFlags,
    XenSingleMemoryRegion,
)

from ._device import RamDisk

DOMID = 3
_WANTED = DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.XEN_MMAP


@dataclass
class XenServed:
    daemon: VhostUserDaemon
    device: RamDisk
    path: Path
    fake: FakeXen


XenFactory = Callable[..., XenServed]


@pytest.fixture
def serve_xen(tmp_path: Path) -> Iterator[XenFactory]:
    """``serve_xen(xen=True)``: a RAM disk daemon on the Xen backend over a
    FakeXen (or on plain mmap with ``xen=False``); after the test: shut
    down, no fd leaked, no grant map or mapping left in the fake."""
    before = open_fds()
    made: list[tuple[XenServed, threading.Thread, list[BaseException]]] = []

    def factory(*, xen: bool = True) -> XenServed:
        fake = FakeXen()
        backend: MemoryBackend = XenBackend(devices=fake) if xen else MmapBackend()
        device = RamDisk()
        daemon = VhostUserDaemon("xen-blk", device, memory_backend=backend)
        path = tmp_path / f"xen{len(made)}.sock"
        errors: list[BaseException] = []

        def run() -> None:
            try:
                daemon.serve(path)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        served = XenServed(daemon, device, path, fake)
        made.append((served, thread, errors))
        return served

    yield factory
    for served, thread, errors in made:
        served.daemon.close()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert errors == []
        assert served.daemon.worker_errors == []
        assert served.fake.grant_maps() == 0, "a grant map was never unmapped"
        assert served.fake.live_mappings == 0, "a Xen mapping was never unmapped"
        served.fake.close()
    assert open_fds() == before, "file descriptors leaked"


def _connect(served: XenServed) -> Frontend:
    return Frontend.connect(served.path, retry_for=5.0, timeout=5.0)


def _foreign(fe: Frontend, fake: FakeXen, ram: GuestRam) -> int:
    handle = fake.open("/dev/xen/privcmd")
    for region in ram.regions:
        fake.add_memory(DOMID, region.gpa // PAGE, region.fd, region.size // PAGE)
    share_xen_memory(
        fe,
        ram,
        [xen_region(r, handle, XenMmapFlags.FOREIGN, DOMID) for r in ram.regions],
    )
    return handle


def _grant(
    fe: Frontend, fake: FakeXen, ram: GuestRam, flags: list[XenMmapFlags], *, add: bool
) -> int:
    handle = fake.open("/dev/xen/gntdev")
    for region in ram.regions:
        ref = (region.gpa & ~XEN_GRANT_ADDR_OFF) // PAGE
        fake.add_grants(DOMID, ref, region.fd, region.size // PAGE)
    regions = [
        xen_region(r, handle, f, DOMID) for r, f in zip(ram.regions, flags, strict=True)
    ]
    share_xen_memory(fe, ram, regions, use_add_mem_reg=add)
    return handle


def _exercise(fe: Frontend, served: XenServed) -> None:
    # Writes then reads through the ring; data checked on both sides.
    blk = BlkDriver(fe, fe.setup_queue(0, 64))
    fe.start_device()
    data = bytes(range(256)) * 32  # 8 KiB: 16 sectors
    blk.write(4, data)
    assert bytes(served.device.disk[4 * 512 : 4 * 512 + len(data)]) == data
    served.device.disk[100 * 512 : 101 * 512] = b"\xa5" * 512
    assert blk.read(100) == b"\xa5" * 512
    assert blk.read(4, 16) == data
    assert served.device.requests == 3


def test_foreign_regions_serve_block_io(serve_xen: XenFactory) -> None:
    served = serve_xen()
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        assert fe.has_protocol_feature(ProtocolFeatures.XEN_MMAP)
        ram = GuestRam([1 << 20, 1 << 20])
        handle = _foreign(fe, served.fake, ram)
        _exercise(fe, served)
        batches = [c for c in served.fake.calls if c.device == "privcmd"]
        # One MMAPBATCH_V2 per region, for exactly its frames.
        assert [c.frames for c in batches] == [
            list(range(r.gpa // PAGE, (r.gpa + r.size) // PAGE)) for r in ram.regions
        ]
        assert {int.from_bytes(c.arg[4:6], "little") for c in batches} == {DOMID}
    os.close(handle)


@pytest.mark.parametrize("add", [False, True], ids=["mem_table", "add_mem_reg"])
def test_grant_regions_serve_block_io(serve_xen: XenFactory, add: bool) -> None:
    served = serve_xen()
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        ram = GuestRam([1 << 20], base_gpa=XEN_GRANT_ADDR_OFF)
        handle = _grant(fe, served.fake, ram, [XenMmapFlags.GRANT], add=add)
        _exercise(fe, served)
        maps = [c for c in served.fake.calls if c.device == "gntdev"]
        # Mapped once, in advance: 256 refs 0..255 of the domain.
        assert len(maps) == 1
        count = int.from_bytes(maps[0].arg[0:4], "little")
        refs = [
            (
                int.from_bytes(maps[0].arg[16 + 8 * i : 20 + 8 * i], "little"),
                int.from_bytes(maps[0].arg[20 + 8 * i : 24 + 8 * i], "little"),
            )
            for i in range(count)
        ]
        assert refs == [(DOMID, ref) for ref in range(256)]
    os.close(handle)


def test_grant_region_mapped_on_demand(serve_xen: XenFactory) -> None:
    # Rings in a grant region mapped in advance (one page), buffers in one
    # mapped per access: each request maps and unmaps its buffer pages.
    served = serve_xen()
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        ram = GuestRam([PAGE, 1 << 20], base_gpa=XEN_GRANT_ADDR_OFF)
        flags = [XenMmapFlags.GRANT, XenMmapFlags.GRANT | XenMmapFlags.NO_ADVANCE_MAP]
        handle = _grant(fe, served.fake, ram, flags, add=False)
        assert served.fake.grant_maps() == 1  # only the ring page
        _exercise(fe, served)
        assert served.fake.grant_maps() == 1  # every per-access map was undone
        maps = [c for c in served.fake.calls if c.request == 0x184700]
        unmaps = [c for c in served.fake.calls if c.request == 0x104701]
        assert len(maps) > 1
        assert len(unmaps) == len(maps) - 1
        # Per-access maps only ever name refs of the on-demand region.
        for call in maps[1:]:
            first = int.from_bytes(call.arg[20:24], "little")
            assert 1 <= first < 1 + 256
    os.close(handle)


def test_ring_in_on_demand_region_is_refused(serve_xen: XenFactory) -> None:
    served = serve_xen()
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        ram = GuestRam([1 << 20], base_gpa=XEN_GRANT_ADDR_OFF)
        flags = [XenMmapFlags.GRANT | XenMmapFlags.NO_ADVANCE_MAP]
        handle = _grant(fe, served.fake, ram, flags, add=False)
        with pytest.raises(RequestRefusedError):
            fe.setup_queue(0, 64)
        assert fe.is_alive()
    os.close(handle)


def test_xen_regions_refused_by_a_plain_daemon(serve_xen: XenFactory) -> None:
    served = serve_xen(xen=False)
    fake = served.fake
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        # Not offered, so not negotiated; the frontend will not send them...
        assert not fe.has_protocol_feature(ProtocolFeatures.XEN_MMAP)
        ram = GuestRam([1 << 20])
        handle = fake.open("/dev/xen/privcmd")
        region = xen_region(ram.regions[0], handle, XenMmapFlags.FOREIGN, DOMID)
        with pytest.raises(LocalProtocolError):
            share_xen_memory(fe, ram, [region])
        os.close(handle)
        # ...and acking it anyway is refused.
        with pytest.raises(RequestRefusedError):
            fe.set_protocol_features(_WANTED)
        assert fe.is_alive()
    ram.close()


def test_forced_xen_table_refused_by_a_plain_daemon(serve_xen: XenFactory) -> None:
    served = serve_xen(xen=False)
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, DEFAULT_PROTOCOL_FEATURES)
        ram = GuestRam([1 << 20])
        handle = served.fake.open("/dev/xen/privcmd")
        # Encode 40-byte regions although XEN_MMAP is not negotiated.
        fe._conn.decoder.xen_mmap = True
        fe.acked_protocol_features |= ProtocolFeatures.XEN_MMAP
        with pytest.raises(RemoteProtocolError):
            share_xen_memory(
                fe, ram, [xen_region(ram.regions[0], handle, XenMmapFlags.FOREIGN, 1)]
            )
        fe._conn.decoder.xen_mmap = False
        assert fe.is_alive()
    os.close(handle)


def test_plain_regions_refused_by_a_xen_daemon(
    serve_xen: XenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    served = serve_xen()
    with _connect(served) as fe:
        # A frontend that does not ack XEN_MMAP is refused after the ack, as
        # rust-vmm does (the ack of REPLY_ACK itself gets no reply)...
        fe.handshake(VirtioFeatures.VERSION_1, DEFAULT_PROTOCOL_FEATURES)
        refusal = "SET_PROTOCOL_FEATURES refused: the xen memory backend requires"
        assert f"{refusal} XEN_MMAP" in caplog.text
        # ...and so are its plain memory regions.
        ram = GuestRam([1 << 20])
        with pytest.raises(RequestRefusedError):
            fe.request(
                FrontendReq.SET_MEM_TABLE,
                MemoryTable((MemoryRegion(0, 1 << 20, ram.regions[0].faddr, 0),)),
                fds=[ram.regions[0].fd],
            )
        assert fe.is_alive()
        ram.close()


def test_memory_and_memory_backend_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="not both"):
        VhostUserDaemon(
            "x", RamDisk(), GuestMemoryAtomic(), memory_backend=MmapBackend()
        )


def test_removed_grant_region_is_unmapped(serve_xen: XenFactory) -> None:
    served = serve_xen()
    with _connect(served) as fe:
        fe.handshake(VirtioFeatures.VERSION_1, _WANTED)
        ram = GuestRam([PAGE, 1 << 16], base_gpa=XEN_GRANT_ADDR_OFF)
        flags = [XenMmapFlags.GRANT, XenMmapFlags.GRANT]
        handle = _grant(fe, served.fake, ram, flags, add=True)
        assert served.fake.grant_maps() == 2
        gone = xen_region(ram.regions[1], handle, XenMmapFlags.GRANT, DOMID)
        fe.request(FrontendReq.REM_MEM_REG, XenSingleMemoryRegion(gone.payload()))
        assert served.fake.grant_maps() == 1
        unmap = served.fake.calls[-1]
        assert unmap.request == 0x104701
        assert int.from_bytes(unmap.arg[8:12], "little") == (1 << 16) // PAGE
    os.close(handle)
