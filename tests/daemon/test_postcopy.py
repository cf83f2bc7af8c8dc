"""Postcopy (PAGEFAULT) with our frontend against our daemon, played as QEMU
plays a migration destination: POSTCOPY_ADVISE hands the frontend the
daemon's userfaultfd, POSTCOPY_LISTEN, the memory table in postcopy mode,
then pages that have not arrived yet are missing from the shared memory and
only the frontend's pager holds them. The device's worker threads fault on
them; the pager places each page after the fault (UFFDIO_COPY) and wakes the
thread. Then POSTCOPY_END.

A thread that faults while holding the GIL would stop this whole process
(the pager's thread included), so the scenarios that fault run in a child
process with a watchdog: a deadlock fails the test instead of hanging it.
Every wait in them is bounded as well."""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.errors import MappingError, RemoteProtocolError
from vubackend.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    BlkDriver,
    BlkRequestType,
    BlkStatus,
    DriverRing,
    Frontend,
    FrontendQueue,
    GuestRam,
    PostcopyPager,
    Userfaultfd,
    frame,
    make_driver_ring,
    userfaultfd_unavailable,
)
from vubackend.memory import GuestMemoryAtomic, select_backend
from vubackend.protocol import (
    HEADER_SIZE,
    FrontendReq,
    Header,
    HeaderFlags,
    MemoryRegion,
    ProtocolFeatures,
    SingleMemoryRegion,
    VirtioFeatures,
)
from vubackend.vring import VringRwLock

from ._device import SECTOR, RamDisk
from .conftest import ServeFactory

PAGE = 4096
HEADER = struct.Struct("<IIQ")  # virtio-blk request header
WAIT = 10.0  # seconds any single wait may take
WATCHDOG = 90.0  # the child's whole scenario
FEATURES = int(VirtioFeatures.VERSION_1)
PROTOCOL = DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.PAGEFAULT

needs_uffd = pytest.mark.skipif(
    userfaultfd_unavailable() is not None,
    reason=f"userfaultfd unavailable: {userfaultfd_unavailable()}",
)


class PostcopyDaemon:
    """A daemon with the postcopy memory backend serving a RamDisk whose two
    queues are served by two worker threads."""

    def __init__(self, path: Path, *, native_rings: bool = True) -> None:
        self.path = path
        self.device = RamDisk(queues=2, per_thread=[0b01, 0b10])
        memory = GuestMemoryAtomic(backend=select_backend(postcopy=True))

        def vring(mem: GuestMemoryAtomic, size: int) -> VringRwLock:
            return VringRwLock(mem, size, native=native_rings)

        self.daemon = VhostUserDaemon("postcopy", self.device, memory, vring_type=vring)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.serve(self.path)
        except BaseException as exc:
            self.errors.append(exc)

    def connect(self) -> Frontend:
        return Frontend.connect(self.path, retry_for=5.0, timeout=WAIT)

    def close(self) -> bool:
        """Close the daemon; whether it finished within the bound."""
        closer = threading.Thread(target=self.daemon.close, daemon=True)
        closer.start()
        closer.join(WAIT)
        self.thread.join(WAIT)
        return not closer.is_alive() and not self.thread.is_alive()


@pytest.fixture
def postcopy_daemon(tmp_path: Path) -> Iterator[PostcopyDaemon]:
    before = open_fds()
    served = PostcopyDaemon(tmp_path / "postcopy.sock")
    yield served
    assert served.close(), "the daemon did not stop"
    assert served.errors == []
    assert served.daemon.worker_errors == []
    assert open_fds() == before, "the daemon leaked file descriptors"


# ---------------------------------------------------------------- no faults


def test_pagefault_is_not_offered_by_the_plain_backend(serve: ServeFactory) -> None:
    with serve().connect() as fe:
        fe.handshake(FEATURES, PROTOCOL)
        assert not fe.has_protocol_feature(ProtocolFeatures.PAGEFAULT)
        fe.check_gates = False  # send it all the same: the daemon refuses
        with pytest.raises(RemoteProtocolError, match="refused"):
            fe.postcopy_listen()
        assert fe.get_queue_num() == 2


def test_pagefault_is_offered_by_the_postcopy_backend(
    postcopy_daemon: PostcopyDaemon,
) -> None:
    with postcopy_daemon.connect() as fe:
        fe.handshake(FEATURES, PROTOCOL)
        assert fe.has_protocol_feature(ProtocolFeatures.PAGEFAULT)


@needs_uffd
def test_listen_needs_advise_first_and_no_memory_yet(
    postcopy_daemon: PostcopyDaemon,
) -> None:
    with postcopy_daemon.connect() as fe:
        fe.handshake(FEATURES, PROTOCOL)
        with pytest.raises(RemoteProtocolError, match="refused"):
            fe.postcopy_listen()
        fe.create_memory([1 << 20])
        uffd = fe.postcopy_advise()
        os.close(uffd)
        with pytest.raises(RemoteProtocolError, match="refused"):
            fe.postcopy_listen()  # regions are mapped already
        # The session goes on, and END leaves postcopy cleanly.
        fe.postcopy_end()
        assert fe.get_queue_num() == 2


@needs_uffd
@pytest.mark.parametrize("add_mem_reg", [False, True], ids=["table", "add-mem-reg"])
def test_postcopy_memory_replies_carry_the_daemons_addresses(
    postcopy_daemon: PostcopyDaemon, add_mem_reg: bool
) -> None:
    with postcopy_daemon.connect() as fe:
        fe.handshake(FEATURES, PROTOCOL)
        ram = GuestRam([64 << 10, 1 << 20])
        pager = fe.enter_postcopy(ram, use_add_mem_reg=add_mem_reg)
        bases = fe.postcopy_bases
        assert set(bases) == {r.gpa for r in ram.regions}
        for region in ram.regions:
            assert bases[region.gpa] != region.faddr
            assert bases[region.gpa] % PAGE == 0
        # Nothing missing, so nothing faults; the session serves I/O.
        queue = fe.setup_queue(0, 64)
        blk = BlkDriver(fe, queue, timeout=WAIT)
        blk.write(3, b"\xa5" * SECTOR)
        assert blk.read(3) == b"\xa5" * SECTOR
        assert pager.stats.faults == 0
        fe.leave_postcopy()


@needs_uffd
def test_regions_added_one_by_one_are_registered_at_the_one_answer(
    postcopy_daemon: PostcopyDaemon,
) -> None:
    """QEMU adds regions with ADD_MEM_REG in postcopy mode and answers once,
    after the last one: no region is registered before that answer, and
    every one is after it."""
    with postcopy_daemon.connect() as fe:
        fe.handshake(FEATURES, PROTOCOL)
        uffd = Userfaultfd(fe.postcopy_advise())
        ram = GuestRam([64 << 10, 64 << 10])
        try:
            fe.postcopy_listen()
            bases = []
            for region in ram.regions:
                body = SingleMemoryRegion(
                    MemoryRegion(region.gpa, region.size, region.faddr, 0)
                ).pack()
                reply = fe.exchange_raw(
                    frame(FrontendReq.ADD_MEM_REG, body), [region.fd]
                )
                header = Header.unpack(reply.data[:HEADER_SIZE])
                assert header.request == FrontendReq.ADD_MEM_REG
                assert header.flags & HeaderFlags.REPLY
                ours = SingleMemoryRegion.unpack(reply.data[HEADER_SIZE:]).region
                assert ours.guest_phys_addr == region.gpa
                assert ours.userspace_addr != region.faddr
                bases.append(ours.userspace_addr)
            page = ctypes.create_string_buffer(b"placed!" * (PAGE // 7), PAGE)
            with pytest.raises(MappingError):  # not registered yet
                uffd.copy(bases[0], ctypes.addressof(page), PAGE)
            fe.send_raw(frame(FrontendReq.ADD_MEM_REG, bytes(8)))  # the answer: 0
            placed = []
            for base in bases:
                deadline = time.monotonic() + WAIT
                while True:
                    try:
                        placed.append(uffd.copy(base, ctypes.addressof(page), PAGE))
                        break
                    except MappingError:
                        assert time.monotonic() < deadline, "never registered"
                        time.sleep(0.01)
            assert placed == [True, True]
            assert [ram.read(r.gpa, 7) for r in ram.regions] == [b"placed!"] * 2
        finally:
            uffd.close()
            ram.close()


# ---------------------------------------------------------------- faults


class Requests:
    """virtio-blk requests built by hand on one queue, so that every buffer
    can live in pages that have not arrived yet (BlkDriver writes its
    buffers through GuestRam, which would fill a missing page with zeros)."""

    def __init__(self, ram: GuestRam, pager: PostcopyPager, queue: FrontendQueue):
        self.ram = ram
        self.pager = pager
        self.queue = queue
        self.ring: DriverRing[str] = make_driver_ring(ram, queue)
        self.staged = 0  # pages made missing
        self.status: dict[str, int] = {}
        self.reads: dict[str, tuple[int, int]] = {}

    def ring_span(self) -> tuple[int, int]:
        start = self.queue.desc
        return start, self.queue.used + self.queue.used_len - start

    def _place(self, data: bytes, *, missing: bool) -> int:
        # Whole pages of their own, page aligned.
        size = -(-len(data) // PAGE) * PAGE
        gpa = self.ram.alloc(size, PAGE)
        if missing:
            self.staged += self.pager.stage(gpa, data.ljust(size, b"\0"))
        else:
            self.ram.write(gpa, data)
        return gpa

    def write(
        self, name: str, sector: int, data: bytes, *, missing: bool = True
    ) -> None:
        header = self._place(
            HEADER.pack(BlkRequestType.OUT, 0, sector), missing=missing
        )
        buffer = self._place(data, missing=missing)
        self.status[name] = self._place(b"\xff", missing=missing)
        self.ring.add(
            [(header, 16), (buffer, len(data))], [(self.status[name], 1)], name
        )

    def read(self, name: str, sector: int, length: int) -> None:
        header = self._place(HEADER.pack(BlkRequestType.IN, 0, sector), missing=True)
        buffer = self._place(b"\x5a" * length, missing=True)  # junk to replace
        self.status[name] = self._place(b"\xff", missing=True)
        self.reads[name] = (buffer, length)
        self.ring.add([(header, 16)], [(buffer, length), (self.status[name], 1)], name)

    def evict_ring(self) -> None:
        """Make the queue's ring pages missing too (after the chains were
        written: the frontend must not touch a missing page)."""
        self.staged += self.pager.evict(*self.ring_span())

    def wait(self, count: int) -> dict[str, int]:
        """Collect ``count`` completions; name -> bytes written. The used
        ring is read only once the device signalled (it has placed the ring
        page by then)."""
        done: dict[str, int] = {}
        deadline = time.monotonic() + WAIT
        while len(done) < count and time.monotonic() < deadline:
            if self.queue.call.wait(0.05):
                done.update(self.ring.collect())
        return done


def _uffd_has_fault(pager: PostcopyPager) -> bool:
    (client,) = pager.clients
    readable, _, _ = select.select([client.uffd.fileno()], [], [], WAIT)
    return bool(readable)


def run_scenario(name: str) -> dict[str, object]:
    """Run ``name`` in a child process with a watchdog; its JSON result."""
    root = Path(__file__).parents[2]
    code = (
        "import json, sys\n"
        "from tests.daemon.test_postcopy import SCENARIOS\n"
        f"print(json.dumps(SCENARIOS[{name!r}]()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=WATCHDOG + 30,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {name} hung (deadlock?): {exc.stderr!r}")
    assert result.returncode == 0, (
        f"scenario {name} failed ({result.returncode}):\n{result.stderr[-6000:]}"
    )
    out: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def _faults_scenario() -> dict[str, object]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    facts: dict[str, object] = {}
    before = open_fds()
    with tempfile.TemporaryDirectory() as tmp:
        served = PostcopyDaemon(Path(tmp) / "postcopy.sock")
        with served.connect() as fe:
            fe.handshake(FEATURES, PROTOCOL)
            # A small region for the rings, headers and status bytes, a
            # large one for the data that does not fit there.
            ram = GuestRam([64 << 10, 4 << 20])
            pager = fe.enter_postcopy(ram)
            q0 = fe.setup_queue(0, 64)
            end = q0.used + q0.used_len
            ram.alloc(-end % PAGE, 1)  # the next ring starts on a page of its own
            q1 = fe.setup_queue(1, 64)
            fe.start_device()
            r0, r1 = Requests(ram, pager, q0), Requests(ram, pager, q1)
            s0, s1 = (set(range(s // PAGE, (s + n - 1) // PAGE + 1)) for s, n in
                      (r0.ring_span(), r1.ring_span()))  # fmt: skip
            facts["rings_share_a_page"] = bool(s0 & s1)

            # 1. One worker blocked on a missing page blocks nobody else:
            # the pager's thread is held back, queue 0's ring is missing.
            pager.stop()
            r0.write("blocked", 0, b"\x01" * SECTOR)
            r0.evict_ring()
            q0.kick.signal()
            facts["fault_pending"] = _uffd_has_fault(pager)
            r1.write("free", 1, b"\x02" * SECTOR, missing=False)
            q1.kick.signal()
            facts["other_queue_done"] = r1.wait(1) == {"free": 1}
            facts["request_answered"] = fe.get_queue_num() == 2
            facts["still_blocked"] = not q0.call.wait(0.2)
            pager.start()
            facts["blocked_done"] = r0.wait(1) == {"blocked": 1}
            facts["blocked_data"] = bytes(served.device.disk[:SECTOR]) == b"\x01" * 512

            # 2. Both workers fault at once, on ring pages, headers, data
            # and status bytes that arrive only after each fault.
            r0.staged = r1.staged = 0
            placed = pager.stats.placed
            data = {name: os.urandom(n * PAGE) for name, n in
                    (("a", 1), ("b", 3), ("c", 32), ("d", 20))}  # fmt: skip
            sectors = {"a": 8, "b": 64, "c": 512, "d": 1024}
            r0.write("a", sectors["a"], data["a"])
            r1.write("b", sectors["b"], data["b"])
            r0.write("c", sectors["c"], data["c"])
            r1.write("d", sectors["d"], data["d"])
            r0.evict_ring()
            r1.evict_ring()
            q0.kick.signal()
            q1.kick.signal()
            done = {**r0.wait(2), **r1.wait(2)}
            facts["writes_done"] = sorted(done)
            facts["writes_status"] = all(
                ram.read(r.status[n], 1)[0] == BlkStatus.OK
                for r, n in ((r0, "a"), (r1, "b"), (r0, "c"), (r1, "d"))
            )
            disk = served.device.disk
            facts["disk_matches"] = all(
                disk[sectors[n] * SECTOR : sectors[n] * SECTOR + len(d)] == d
                for n, d in data.items()
            )
            staged_writes = r0.staged + r1.staged
            # 3. Reads: the device writes into missing pages.
            r0.staged = r1.staged = 0
            r0.read("a-back", sectors["a"], len(data["a"]))
            r1.read("c-back", sectors["c"], len(data["c"]))
            r0.read("d-back", sectors["d"], len(data["d"]))
            r0.evict_ring()
            r1.evict_ring()
            q0.kick.signal()
            q1.kick.signal()
            done = {**r0.wait(2), **r1.wait(1)}
            facts["reads_done"] = sorted(done)
            facts["reads_match"] = all(
                ram.read(r.reads[f"{n}-back"][0], len(data[n])) == data[n]
                for r, n in ((r0, "a"), (r1, "c"), (r0, "d"))
            )
            stats = pager.stats
            facts["staged"] = staged_writes + r0.staged + r1.staged
            facts["placed_by_faults"] = stats.placed - placed
            facts["missing"] = len(pager.missing_pages)
            facts["faults"] = stats.faults
            facts["resolved"] = stats.resolved
            facts["errors"] = list(pager.errors)
            facts["threads"] = sorted(served.device.threads_used)

            # 4. POSTCOPY_END, then I/O as usual.
            fe.leave_postcopy()
            blk = BlkDriver(fe, q1, timeout=WAIT)
            facts["after_end"] = blk.read(sectors["b"], 3 * PAGE // SECTOR) == data["b"]
        facts["daemon_stopped"] = served.close()
        facts["daemon_errors"] = [repr(e) for e in served.errors]
        facts["worker_errors"] = [repr(e) for e in served.daemon.worker_errors]
    facts["leaked_fds"] = len(open_fds() - before)
    return facts


def _hangup_scenario() -> dict[str, object]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    facts: dict[str, object] = {}
    before = open_fds()
    with tempfile.TemporaryDirectory() as tmp:
        served = PostcopyDaemon(Path(tmp) / "postcopy.sock")
        fe = served.connect()
        try:
            fe.handshake(FEATURES, PROTOCOL)
            ram = GuestRam([64 << 10])
            pager = fe.enter_postcopy(ram)
            q0 = fe.setup_queue(0, 64)
            requests = Requests(ram, pager, q0)
            pager.stop()  # nobody will serve the fault
            requests.write("never", 0, b"\x03" * SECTOR)
            requests.evict_ring()
            q0.kick.signal()
            facts["fault_pending"] = _uffd_has_fault(pager)
        finally:
            # The frontend goes away with a worker still blocked.
            fe.close()
        # Ending the session unregisters the memory, which wakes the worker;
        # the rings then stop and the next session can come.
        with served.connect() as again:
            again.handshake(FEATURES, PROTOCOL)
            facts["next_session"] = again.get_queue_num() == 2
        facts["daemon_stopped"] = served.close()
        facts["daemon_errors"] = [repr(e) for e in served.errors]
    facts["leaked_fds"] = len(open_fds() - before)
    return facts


def _python_rings_scenario() -> dict[str, object]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    facts: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Rings asked to walk in Python: on postcopy memory they walk in the
        # native helper all the same (a Python walk holds the GIL).
        served = PostcopyDaemon(Path(tmp) / "postcopy.sock", native_rings=False)
        with served.connect() as fe:
            fe.handshake(FEATURES, PROTOCOL)
            ram = GuestRam([1 << 20])
            pager = fe.enter_postcopy(ram)
            # 256 descriptors fill a page: the descriptor table and the
            # available ring fault separately.
            queue = fe.setup_queue(0, 256)
            facts["table_page_apart"] = (
                queue.desc % PAGE == 0 and queue.avail % PAGE == 0
            )
            requests = Requests(ram, pager, queue)
            requests.write("late", 5, b"\x04" * SECTOR)
            requests.evict_ring()
            requests.queue.kick.signal()
            facts["done"] = requests.wait(1) == {"late": 1}
            facts["faults"] = pager.stats.faults
            fe.leave_postcopy()
        facts["daemon_stopped"] = served.close()
    return facts


SCENARIOS = {
    "faults": _faults_scenario,
    "hangup": _hangup_scenario,
    "python-rings": _python_rings_scenario,
}


@needs_uffd
@pytest.mark.slow
def test_workers_fault_on_pages_that_arrive_late_without_stalling_others() -> None:
    facts = run_scenario("faults")
    assert facts["rings_share_a_page"] is False
    # A worker blocked on a fault stalls neither the other worker nor the
    # request thread; it goes on once the page arrives.
    assert facts["fault_pending"] is True
    assert facts["other_queue_done"] is True
    assert facts["request_answered"] is True
    assert facts["still_blocked"] is True
    assert facts["blocked_done"] is True
    assert facts["blocked_data"] is True
    # Both workers read data that arrived only after their faults.
    assert facts["threads"] == [0, 1]
    assert facts["writes_done"] == ["a", "b", "c", "d"]
    assert facts["writes_status"] is True
    assert facts["disk_matches"] is True
    assert facts["reads_done"] == ["a-back", "c-back", "d-back"]
    assert facts["reads_match"] is True
    staged = facts["staged"]
    assert isinstance(staged, int)
    assert staged > 80
    # Every missing page was placed, and only by a fault (nothing else
    # places pages before POSTCOPY_END).
    assert facts["placed_by_faults"] == staged
    assert facts["missing"] == 0
    assert facts["resolved"] == facts["faults"]
    assert facts["errors"] == []
    assert facts["after_end"] is True
    assert facts["daemon_stopped"] is True
    assert facts["daemon_errors"] == facts["worker_errors"] == []
    assert facts["leaked_fds"] == 0


@needs_uffd
@pytest.mark.slow
def test_a_frontend_that_leaves_during_a_fault_does_not_hang_the_daemon() -> None:
    facts = run_scenario("hangup")
    assert facts == {
        "fault_pending": True,
        "next_session": True,
        "daemon_stopped": True,
        "daemon_errors": [],
        "leaked_fds": 0,
    }


@needs_uffd
def test_rings_configured_for_python_walks_use_the_native_walker_on_postcopy() -> None:
    facts = run_scenario("python-rings")
    assert facts["table_page_apart"] is True
    assert facts["done"] is True
    faults = facts["faults"]
    assert isinstance(faults, int)
    assert faults >= 4  # the ring page, the header, the data, the status
    assert facts["daemon_stopped"] is True
