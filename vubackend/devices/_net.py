# virtio-net (virtio 1.x §5.1): queue pairs (RX 2k, TX 2k+1), a control
# queue after them, the virtio-net header, MRG_RXBUF, MAC and link status in
# config space. Frames go to and come from a Link (_net_links.py).
#
# Rules:
# * Built only on the public daemon and vring API. One worker per queue pair
#   (queues_per_thread); the control queue is served by worker 0. Every
#   piece of per-pair state (_Pair) is touched only by that pair's worker,
#   except the generation counter, which the request thread bumps when a
#   ring of the pair (re)starts so that the worker forgets chains it held
#   from the ring's previous life.
# * The data path works per batch: TX chains are popped, handed to the link
#   and returned a batch at a time (VringT.drain_batches: one publication
#   and at most one interrupt per batch, no object per frame for a link
#   that needs only lengths); RX (_net_rx.py) fills a batch of chains with
#   the link's frames (Link.receive_many), or with the loopback's TX chains,
#   in one native call, and returns it with one add_used_batch and at most
#   one interrupt. A busy pair yields its worker after MAX_ROUNDS rounds (a
#   wake-up brings it back), so that the worker's other events and a ring
#   stop are not held off. Per frame there is one copy (TX buffer to RX
#   buffer for the loopback; link buffer to RX buffer otherwise) and no
#   header object: the header is written from one prepared bytes object.
# * Nothing is lost by the device itself: TX chains the link cannot take yet
#   stay pending (in order, first next time), RX chains popped ahead stay as
#   spares, and a frame from the link that found no room is kept until the
#   guest posts buffers. Frames are dropped only when the guest's buffer
#   cannot hold one (without MRG_RXBUF) or a chain is malformed; both are
#   counted.
# * The guest is hostile: short TX chains, RX chains without writable room
#   or smaller than the header, and bad control commands are answered (used
#   length 0, or VIRTIO_NET_ERR), counted and logged, never raised into the
#   worker. A ring error (broken ring, unmapped memory) drops what the pair
#   held and ends the round; the next kick starts afresh.
# * No filtering: the device accepts every frame, as a promiscuous NIC; RX
#   mode, MAC table and VLAN commands are acknowledged and remembered.

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from vubackend.daemon import VhostUserBackend
from vubackend.devices._net_control import (
    CTRL_OK,
    ControlState,
    NetFeatures,
    parse_mac,
    random_mac,
)
from vubackend.devices._net_links import Link
from vubackend.devices._net_rx import HEADER_SIZE, LEGACY_HEADER_SIZE, RxPath
from vubackend.errors import DescriptorChainError, DeviceError, RingStateError
from vubackend.protocol import ProtocolFeatures, VirtioFeatures
from vubackend.vring import ChainBatch

if TYPE_CHECKING:
    from vubackend.daemon import VhostUserDaemon, VringEpollHandler
    from vubackend.vring import DescriptorChain, VringT

__all__ = ["NetDevice", "NetFeatures", "NetStats"]

log = logging.getLogger("vubackend.devices.net")


@dataclass(frozen=True)
class NetStats:
    """Counters of a :class:`NetDevice`, all queue pairs together.

    Attributes:
        tx_frames: frames the guest sent that the link took.
        tx_bytes: their bytes (headers not counted).
        rx_frames: frames written into the guest's RX buffers.
        rx_bytes: their bytes (headers not counted).
        rx_dropped: frames dropped because an RX buffer could not hold them.
        errors: malformed chains and refused control commands.
        control_commands: control queue commands acknowledged with OK.
    """

    tx_frames: int
    tx_bytes: int
    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    errors: int
    control_commands: int


# Link status (config space).
_LINK_UP: Final = 1
# A control command carries at most two MAC tables; a few KiB suffice.
_CTRL_MAX: Final = 64 * 1024
# Chains popped per call: a TX batch.
TX_BATCH: Final = 256
# Most TX chains per pump round (the RX side gets its turn in between).
TX_BUDGET: Final = 1024
# Frames taken from the link per round before TX gets a turn again.
RX_BUDGET: Final = 256
# Rounds of one event before the worker looks at its other events.
MAX_ROUNDS: Final = 64
_MAX_QUEUE_PAIRS: Final = 127


def _ready(vring: VringT) -> bool:
    with vring.get_ref() as state:
        return state.get_queue().ready and state.is_enabled()


@final
class _Pair:
    """One queue pair, as its worker sees it."""

    __slots__ = (
        "errors",
        "index",
        "pending",
        "recv",
        "rx",
        "seen_rx",
        "seen_tx",
        "tx",
        "tx_blocked",
        "tx_bytes",
        "tx_frames",
        "tx_used",
        "wake",
        "watching",
    )

    def __init__(self, index: int, wake: int) -> None:
        self.index = index
        self.wake = wake
        self.rx: VringT | None = None
        self.tx: VringT | None = None
        self.recv = RxPath()
        self.seen_rx = self.seen_tx = 0
        self.pending: list[DescriptorChain] = []
        self.tx_used: list[int] = []  # ids of TX chains done (used length 0)
        self.tx_blocked = False
        self.watching = False
        self.tx_frames = self.tx_bytes = 0
        self.errors = 0

    def forget(self, *, rx: bool = True, tx: bool = True) -> None:
        # Chains of a ring that restarted or broke: never handed back. A
        # frame from the link waiting for room is not a chain: it stays.
        if rx:
            self.recv.forget()
        if tx:
            self.pending = []
            self.tx_used = []
            self.tx_blocked = False


@final
class NetDevice(VhostUserBackend):
    """virtio-net, exchanging frames with a :class:`Link`.

    Call :meth:`attach` with the daemon that serves the device (it watches
    the link's fds on the workers), and :meth:`close` after the daemon's
    close.

    Args:
        link: where frames go and come from (it is attached now).
        queue_pairs: RX/TX queue pairs (MQ above 1); one worker each.
        mac: the MAC address in config space (``"52:54:00:12:34:56"`` or 6
            bytes); a random locally administered one by default.
        control_queue: offer the control queue (CTRL_VQ, CTRL_RX,
            CTRL_VLAN, CTRL_MAC_ADDR) after the data queues.
        max_queue_size: the largest ring the front-end may set up.
        busy_poll: seconds a worker keeps polling its TX ring for more
            frames once it ran dry, before it re-enables kicks and sleeps
            (0, the default, never polls; a busy CPU for fewer kicks).

    Raises:
        ValueError: a bad argument.
        DeviceError: the link could not be opened.
    """

    def __init__(
        self,
        link: Link,
        *,
        queue_pairs: int = 1,
        mac: str | bytes | None = None,
        control_queue: bool = True,
        max_queue_size: int = 1024,
        busy_poll: float = 0.0,
    ) -> None:
        if not 1 <= queue_pairs <= _MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs {queue_pairs} is not in 1..127")
        if not 0.0 <= busy_poll <= 1.0:
            raise ValueError(f"busy-poll window {busy_poll} s is not in 0..1 s")
        self.busy_poll = busy_poll
        self._state = ControlState(
            parse_mac(mac) if mac is not None else random_mac(), queue_pairs
        )
        self._pairs_max = queue_pairs
        self._ctrl = control_queue
        self._max_size = max_queue_size
        self._link = link
        self._acked = 0
        self._header = HEADER_SIZE
        self._mrg = False
        self._log = False
        self._usable = 1
        self._ctrl_acked = False
        # Starts of each data ring (bumped by the request thread).
        self._gens = [0] * (2 * queue_pairs)
        self._handlers: list[VringEpollHandler] = []
        self._control_ok = 0
        self._control_errors = 0
        wakes: list[int] = []
        try:
            for _ in range(queue_pairs):
                wakes.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            link.attach(queue_pairs, self._deliver)
        except BaseException:
            for fd in wakes:
                os.close(fd)
            raise
        self._pairs = [_Pair(k, fd) for k, fd in enumerate(wakes)]
        self._closed = False

    # ------------------------------------------------------------ public

    @property
    def mac(self) -> bytes:
        """The MAC address in config space (the driver may change it)."""
        return self._state.mac

    @property
    def rx_mode(self) -> dict[int, bool]:
        """RX mode switches the driver set (command number -> on)."""
        return self._state.rx_mode

    @property
    def vlans(self) -> set[int]:
        """VLAN ids the driver added."""
        return self._state.vlans

    @property
    def mac_table(self) -> tuple[list[bytes], list[bytes]]:
        """The unicast and multicast MAC tables the driver set."""
        return self._state.mac_table

    @property
    def active_pairs(self) -> int:
        """Queue pairs the driver asked for (MQ VQ_PAIRS_SET)."""
        return self._state.active_pairs

    @property
    def link(self) -> Link:
        return self._link

    @property
    def queue_pairs(self) -> int:
        return self._pairs_max

    def stats(self, pair: int | None = None) -> NetStats:
        """The counters of the whole device, or of one queue pair (whose
        control-queue counters are 0)."""
        whole = pair is None
        pairs = self._pairs if pair is None else [self._pairs[pair]]
        return NetStats(
            tx_frames=sum(p.tx_frames for p in pairs),
            tx_bytes=sum(p.tx_bytes for p in pairs),
            rx_frames=sum(p.recv.frames for p in pairs),
            rx_bytes=sum(p.recv.size for p in pairs),
            rx_dropped=sum(p.recv.dropped for p in pairs),
            errors=sum(p.errors + p.recv.errors for p in pairs)
            + (self._control_errors if whole else 0),
            control_commands=self._control_ok if whole else 0,
        )

    def attach(self, daemon: VhostUserDaemon) -> None:
        """Register the device's fds (a wake-up eventfd per pair, the
        link's fds) on the workers of ``daemon``, which must serve this
        device. Call once, before the daemon serves.

        Raises:
            DeviceError: already attached, or the daemon has other workers.
        """
        handlers = daemon.get_epoll_handlers()
        if self._handlers:
            raise DeviceError("the net device is already attached to a daemon")
        if len(handlers) != self._pairs_max:
            raise DeviceError(
                f"the daemon has {len(handlers)} workers; the net device needs "
                f"one per queue pair ({self._pairs_max})"
            )
        self._handlers = handlers
        for pair, handler in zip(self._pairs, handlers, strict=True):
            handler.register_listener(
                pair.wake, select.EPOLLIN, self._token(pair.index)
            )
            self._watch(pair, True)

    def close(self) -> None:
        """Close the link and the device's fds (after the daemon closed)."""
        if self._closed:
            return
        self._closed = True
        for pair in self._pairs:
            if self._handlers:
                self._watch(pair, False)
                self._handlers[pair.index].unregister_listener(pair.wake)
            os.close(pair.wake)
        self._link.close()

    # ------------------------------------------------------------ backend API

    def num_queues(self) -> int:
        return 2 * self._pairs_max + (1 if self._ctrl else 0)

    def max_queue_size(self) -> int:
        return self._max_size

    def features(self) -> int:
        features = (
            VirtioFeatures.VERSION_1
            | VirtioFeatures.PROTOCOL_FEATURES
            | VirtioFeatures.INDIRECT_DESC
            | VirtioFeatures.EVENT_IDX
            | VirtioFeatures.RING_PACKED
            | VirtioFeatures.IN_ORDER
        )
        net = NetFeatures.MAC | NetFeatures.STATUS | NetFeatures.MRG_RXBUF
        if self._ctrl:
            net |= (
                NetFeatures.CTRL_VQ
                | NetFeatures.CTRL_RX
                | NetFeatures.CTRL_VLAN
                | NetFeatures.CTRL_MAC_ADDR
            )
        if self._pairs_max > 1:
            net |= NetFeatures.MQ
        return int(features) | int(net)

    def protocol_features(self) -> ProtocolFeatures:
        return ProtocolFeatures.MQ | ProtocolFeatures.CONFIG

    def acked_features(self, features: int) -> None:
        self._acked = features
        self._mrg = bool(features & NetFeatures.MRG_RXBUF)
        modern = features & (VirtioFeatures.VERSION_1 | NetFeatures.MRG_RXBUF)
        self._header = HEADER_SIZE if modern else LEGACY_HEADER_SIZE
        self._log = bool(features & VirtioFeatures.LOG_ALL)
        self._ctrl_acked = self._ctrl and bool(features & NetFeatures.CTRL_VQ)
        self._usable = self._pairs_max if features & NetFeatures.MQ else 1
        for pair in self._pairs:
            os.eventfd_write(pair.wake, 1)

    def queues_per_thread(self) -> Sequence[int]:
        masks = [0b11 << (2 * k) for k in range(self._pairs_max)]
        if self._ctrl:
            masks[0] |= 1 << (2 * self._pairs_max)
        return masks

    def get_config(self, offset: int, size: int) -> bytes:
        config = self._config()
        if offset < 0 or size < 0 or offset + size > len(config):
            return b""
        return config[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > 6:
            raise DeviceError(
                f"virtio-net config write at {offset} (+{len(data)}): only the "
                f"MAC address (bytes 0-5) is writable"
            )
        mac = bytearray(self._state.mac)
        mac[offset : offset + len(data)] = data
        self._state.mac = bytes(mac)

    def reset_device(self) -> None:
        self._bump_all()
        self._state.active_pairs = 1

    def queue_started(self, index: int, vring: VringT) -> None:
        del vring
        if index < 2 * self._pairs_max:
            self._gens[index] += 1
            os.eventfd_write(self._pairs[index // 2].wake, 1)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        del evset
        if device_event == 2 and thread_id == 0:
            if self._ctrl_acked and self._usable == self._pairs_max:
                self._control(vrings[2])
            return
        pair = self._pairs[thread_id]
        if device_event > 2:
            if device_event == self._token(thread_id):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(pair.wake)
        elif self._ctrl_acked and self._usable == 1 and thread_id == 1:
            # Without MQ the control queue is queue 2: pair 1's RX slot.
            if device_event == 0:
                self._control(vrings[0])
            return
        if pair.rx is None:
            pair.rx, pair.tx = vrings[0], vrings[1]
            pair.recv.ring = vrings[0]
        if thread_id < self._usable:
            self._pump(pair)
        else:
            # A pair the driver did not ask for (no MQ): its link fd would
            # wake the worker for nothing. SET_FEATURES wakes it again.
            self._watch(pair, False)

    # ------------------------------------------------------------ data path

    def _token(self, pair: int) -> int:
        # Listener tokens above the ring indices: wake-ups, then link fds.
        return self.num_queues() + 1 + 2 * pair

    def _watch(self, pair: _Pair, on: bool) -> None:
        fd = self._link.fileno(pair.index)
        if fd is None or not self._handlers or on == pair.watching:
            return
        handler = self._handlers[pair.index]
        if on:
            handler.register_listener(fd, select.EPOLLIN, self._token(pair.index) + 1)
        else:
            handler.unregister_listener(fd)
        pair.watching = on

    def _bump_all(self) -> None:
        for k in range(2 * self._pairs_max):
            self._gens[k] += 1

    def _pump(self, p: _Pair) -> None:
        rx, tx = p.rx, p.tx
        assert rx is not None
        assert tx is not None
        gen_rx, gen_tx = self._gens[2 * p.index], self._gens[2 * p.index + 1]
        if (gen_rx, gen_tx) != (p.seen_rx, p.seen_tx):
            p.forget(rx=gen_rx != p.seen_rx, tx=gen_tx != p.seen_tx)
            p.seen_rx, p.seen_tx = gen_rx, gen_tx
        recv = p.recv
        if (recv.header, recv.mrg, recv.log) != (self._header, self._mrg, self._log):
            recv.configure(self._header, self._mrg, self._log)
        try:
            recv.ok = _ready(rx)
            tx_ok = _ready(tx)
            if not recv.ok:
                recv.forget()
            rounds = 0
            while True:
                recv.starved = False
                moved = self._transmit(p, tx) if tx_ok else 0
                if recv.ok:
                    moved += recv.receive(self._link, p.index, RX_BUDGET)
                self._flush(p, tx)
                if moved:
                    rounds += 1
                    if rounds < MAX_ROUNDS:
                        continue
                    # Busy for long: let the worker serve its other events
                    # (and the request thread stop a ring), then come back.
                    os.eventfd_write(p.wake, 1)
                    break
                again = False
                if (
                    self.busy_poll
                    and tx_ok
                    and not p.tx_blocked
                    and tx.poll_available(self.busy_poll)
                ):
                    # The optional busy-poll window found more frames:
                    # go on with kicks still off.
                    continue
                if tx_ok and not p.tx_blocked:
                    again = tx.enable_notification()
                if recv.ok:
                    if recv.starved:
                        again = rx.enable_notification() or again
                    else:
                        rx.disable_notification()
                if not again:
                    break
            self._watch(p, recv.ok and not recv.pending)
        except (RingStateError, DescriptorChainError, ValueError) as exc:
            # ValueError: a chain's memory was unmapped under it, or the
            # ring refused a used entry. The pair starts afresh.
            log.warning("net: queue pair %d: %s; dropping its chains", p.index, exc)
            p.errors += 1
            p.forget()

    def _transmit(self, p: _Pair, tx: VringT) -> int:
        # Per batch: the ring hands whole batches to _take_batch (ids and
        # lengths, no object per frame unless the link needs the data) and
        # returns what it took with one publication each (drain_batches).
        # Chains a link could not take wait in p.pending, first in line.
        p.tx_blocked = False
        tx.disable_notification()
        done = 0
        if p.pending:
            chains, p.pending = p.pending, []
            header = self._header
            # Counted first, as in _take_batch.
            sizes = [max(c.readable_len - header, 0) for c in chains]
            p.tx_frames += len(chains)
            p.tx_bytes += sum(sizes)
            taken = self._link.transmit(p.index, chains, header)
            p.tx_frames -= len(chains) - taken
            p.tx_bytes -= sum(sizes[taken:])
            p.tx_used += [c.head for c in chains[:taken]]
            if taken < len(chains):
                p.pending = chains[taken:]
                p.tx_blocked = True
                return taken
            done = taken
        serve = functools.partial(self._take_batch, p)
        return done + tx.drain_batches(serve, max_chains=TX_BATCH, budget=TX_BUDGET)

    def _take_batch(self, p: _Pair, batch: ChainBatch) -> int:
        # One TX batch to the link; what it did not take waits in p.pending.
        # Counted before the link sees it: what it makes of the frames (the
        # loopback's RX) may reach the guest before it returns.
        header = self._header
        count = len(batch)
        size = batch.readable_bytes(header)
        p.tx_frames += count
        p.tx_bytes += size
        taken = self._link.transmit_batch(p.index, batch, header)
        if taken != count:
            lengths = batch.readable_lens[taken:]
            p.tx_frames -= count - taken
            p.tx_bytes -= sum(max(n - header, 0) for n in lengths)
            p.pending = batch.chains()[taken:]
            p.tx_blocked = True
        return taken

    def _deliver(
        self, pair: int, frames: Sequence[DescriptorChain] | ChainBatch, header: int
    ) -> int:
        # The loopback path: TX chains of `pair` into its RX queue.
        recv = self._pairs[pair].recv
        if isinstance(frames, ChainBatch):
            return recv.forward(frames, header)
        return recv.deliver(frames, header)

    def _flush(self, p: _Pair, tx: VringT) -> None:
        if p.tx_used:
            tx.add_used_heads(p.tx_used)  # TX chains: used length 0
            p.tx_used = []
            tx.signal_if_needed()
        p.recv.flush()

    # ------------------------------------------------------------ config, control

    def _config(self) -> bytes:
        # struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu,
        # speed (unknown), duplex (unknown).
        return self._state.mac + struct.pack(
            "<HHHIB", _LINK_UP, self._pairs_max, 1500, 0xFFFFFFFF, 0xFF
        )

    def _control(self, vring: VringT) -> None:
        try:
            while True:
                vring.disable_notification()
                used = [(c.head, self._command(c)) for c in vring.pop_chains()]
                if used:
                    vring.add_used_many(used)
                    vring.signal_if_needed()
                if not vring.enable_notification():
                    return
        except (RingStateError, DescriptorChainError, ValueError) as exc:
            log.warning("net: control queue: %s", exc)
            self._control_errors += 1

    def _command(self, chain: DescriptorChain) -> int:
        if chain.readable_len < 2 or chain.writable_len < 1:
            log.warning(
                "net: control command without room for class, command and ack "
                "(%d readable, %d writable bytes); not answered",
                chain.readable_len,
                chain.writable_len,
            )
            self._control_errors += 1
            return 0
        data = chain.read(min(chain.readable_len, _CTRL_MAX))
        ack = self._state.apply(data[0], data[1], data[2:], self._acked)
        if ack == CTRL_OK:
            self._control_ok += 1
        else:
            self._control_errors += 1
            log.info("net: control command class %d cmd %d refused", data[0], data[1])
        return chain.write(bytes([ack]))
