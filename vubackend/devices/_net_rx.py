# The receive side of one virtio-net queue pair: RX chains popped ahead,
# frames waiting for room, used entries not yet returned (_net.py drives it).
#
# Rules:
# * Two paths, one order. The batch path fills whole RX batches natively
#   (ChainBatch.fill for frames from the link, ChainBatch.forward for the
#   loopback's TX chains), one frame per chain, and returns them with one
#   add_used_batch. A frame its chain cannot hold (merged buffers, a drop),
#   a malformed chain, or chains given back go through the per-chain path
#   (write_frame), which handles every case. Chains are always taken in ring
#   order and returned in that order (IN_ORDER may be negotiated): the batch
#   path runs only when no chain is waiting in the per-chain path, and
#   entries of the per-chain path are returned before a batch's.
# * Nothing is lost here: chains taken for a frame that did not fit are
#   given back (first in line), frames that found no room wait in `pending`
#   (copies: a link may reuse its buffer).
# * Touched only by the pair's worker (see _net.py).

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, final

from vubackend.devices._net_links import frame_pieces

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vubackend.devices._net_links import Link
    from vubackend.vring import ChainBatch, DescriptorChain, VringT

__all__ = ["HEADER_SIZE", "LEGACY_HEADER_SIZE", "RxPath"]

# The header (virtio 1.x §5.1.6): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, then num_buffers with VERSION_1 or MRG_RXBUF.
_HEADER_V1: Final = struct.Struct("<BBHHHHH")
HEADER_SIZE: Final = _HEADER_V1.size
LEGACY_HEADER_SIZE: Final = 10
# RX chains popped ahead of need, per call.
RX_BATCH: Final = 256


def _scatter(dst: list[memoryview], offset: int, src: Sequence[Buffer]) -> None:
    # Copy the pieces of src, one after the other, into the concatenation of
    # dst from byte `offset` on (the caller checked that it fits).
    k = 0
    while offset >= len(dst[k]):
        offset -= len(dst[k])
        k += 1
    for piece in src:
        data = memoryview(piece).cast("B")
        while len(data):
            view = dst[k]
            n = min(len(view) - offset, len(data))
            view[offset : offset + n] = data[:n]
            data = data[n:]
            offset += n
            if offset == len(view):
                k += 1
                offset = 0


@final
class RxPath:
    """The receive side of one queue pair (see the module's rules).

    Attributes:
        ring: the RX ring, once the pair has seen one.
        ok: whether the ring is ready (set by the device each round).
        starved: the last take found the ring empty (kicks wanted).
        pending: frames from the link that found no room yet.
        frames, size, dropped, errors: counters (frames written, their
            bytes without header, frames dropped for want of room,
            malformed chains).
    """

    __slots__ = (
        "_at",
        "_batches",
        "_one",
        "_spare_at",
        "_spares",
        "_used",
        "dropped",
        "errors",
        "frames",
        "header",
        "log",
        "mrg",
        "ok",
        "pending",
        "ring",
        "size",
        "starved",
    )

    def __init__(self) -> None:
        self.ring: VringT | None = None
        self.ok = False
        self.starved = False
        self.pending: list[bytes] = []
        self.frames = self.size = self.dropped = self.errors = 0
        self.header = HEADER_SIZE
        self.mrg = False
        self.log = False
        self._one = _HEADER_V1.pack(0, 0, 0, 0, 0, 0, 1)
        self._spares: list[DescriptorChain] = []
        self._spare_at = 0
        self._batches: list[ChainBatch] = []
        self._at = 0
        self._used: list[tuple[int, int]] = []

    def configure(self, header: int, mrg: bool, log: bool) -> None:
        """The negotiated header size, MRG_RXBUF and LOG_ALL."""
        self.header, self.mrg, self.log = header, mrg, log
        self._one = self._header_bytes(1)

    def forget(self) -> None:
        """Drop the chains of a ring that restarted or broke (never handed
        back); frames waiting for room stay."""
        self._spares, self._spare_at = [], 0
        self._batches, self._at = [], 0
        self._used = []
        self.starved = False

    def _header_bytes(self, buffers: int) -> bytes:
        if self.header == HEADER_SIZE:
            return _HEADER_V1.pack(0, 0, 0, 0, 0, 0, buffers)
        return bytes(LEGACY_HEADER_SIZE)

    # ------------------------------------------------------------ frames in

    def receive(self, link: Link, pair: int, budget: int) -> int:
        """Frames from ``link`` into the RX ring, up to ``budget``; returns
        how many were written (or dropped for want of room)."""
        done = 0
        while done < budget:
            if self.pending:
                # Frames that found no room come first, one at a time.
                if not self.write_frame((self.pending[0],), len(self.pending[0])):
                    return done
                del self.pending[0]
                done += 1
                continue
            batch = self._next_batch()
            if batch is None:
                # The per-chain path: one frame at a time.
                got = link.receive(pair)
                if got is None:
                    break
                if not self.write_frame((got,), len(got)):
                    self.pending.append(bytes(got))
                    break
                done += 1
                continue
            at = self._at
            frames = link.receive_many(pair, min(len(batch) - at, budget - done))
            if not frames:
                break
            used = batch.fill(frames, self._one, start=at)
            self._complete(batch, used)
            done += len(used)
            if len(used) < len(frames):
                # A frame its chain cannot hold: the per-chain path.
                self.pending += [bytes(f) for f in frames[len(used) :]]
                self._to_spares()
        return done

    def forward(self, batch: ChainBatch, header: int) -> int:
        """The loopback: the frames of TX ``batch`` into the RX ring;
        returns how many TX chains were handled (delivered or dropped as
        malformed), from the first."""
        taken = 0
        count = len(batch)
        while taken < count:
            dst = self._next_batch()
            if dst is None:
                chains = batch.chains()[taken:]
                return taken + self.deliver(chains, header)
            at = self._at
            used = dst.forward(
                batch,
                count - taken,
                start=at,
                src_start=taken,
                skip=header,
                prefix=self._one,
            )
            self._complete(dst, used)
            taken += len(used)
            if taken < count and self._at < len(dst):
                if batch.words[8 * taken + 5] <= header:
                    self.errors += 1  # an empty frame: not delivered
                    taken += 1
                    continue
                # A frame its chain cannot hold: the per-chain path.
                self._to_spares()
                if not self.deliver(batch.chains()[taken : taken + 1], header):
                    return taken
                taken += 1
        return taken

    def deliver(self, chains: Sequence[DescriptorChain], header: int) -> int:
        """The loopback's per-chain path: TX chains into the RX ring;
        returns how many were handled, from the first."""
        for k, chain in enumerate(chains):
            length = chain.readable_len - header
            if length <= 0:
                self.errors += 1
                continue
            if not self.write_frame(frame_pieces(chain, header), length):
                return k
        return len(chains)

    def _next_batch(self) -> ChainBatch | None:
        # The batch the batch path fills next, popping one if needed; None
        # when the per-chain path must go first or the ring is empty.
        if self._spare_at < len(self._spares) or not self.ok:
            return None
        batches = self._batches
        while batches and self._at >= len(batches[0]):
            del batches[0]
            self._at = 0
        if not batches:
            assert self.ring is not None
            batches += self.ring.pop_batches(RX_BATCH)
            if not batches:
                self.starved = True
                return None
        return batches[0]

    def _complete(self, batch: ChainBatch, used: array[int]) -> None:
        # Return the chains the batch path filled, after the per-chain
        # path's entries (ring order); counted first, so that whatever the
        # guest sees is in the counters.
        if not used:
            return
        self.flush()
        assert self.ring is not None
        self.frames += len(used)
        self.size += sum(used) - self.header * len(used)
        self.ring.add_used_batch(batch, len(used), used, first=self._at)
        self._at += len(used)

    def _to_spares(self) -> None:
        # Hand the chains popped ahead to the per-chain path, in order.
        rest = [c for b in self._batches for c in b.chains()]
        if rest:
            rest = rest[self._at :]
        self._spares = self._spares[self._spare_at :] + rest
        self._spare_at = 0
        self._batches, self._at = [], 0

    # ------------------------------------------------------------ per chain

    def _take(self) -> DescriptorChain | None:
        spares = self._spares
        if self._spare_at < len(spares):
            chain = spares[self._spare_at]
            self._spare_at += 1
            return chain
        if self._batches:
            self._to_spares()
            return self._take()
        if not self.ok or self.ring is None:
            self.starved = True
            return None
        chains = self.ring.pop_chains(RX_BATCH)
        if not chains:
            self._spares, self._spare_at = [], 0
            self.starved = True
            return None
        self._spares, self._spare_at = chains, 1
        return chains[0]

    def _give_back(self, chains: list[DescriptorChain]) -> None:
        # Chains taken for a frame that did not fit: first in line next time.
        self._spares = chains + self._spares[self._spare_at :]
        self._spare_at = 0

    def write_frame(self, src: Sequence[Buffer], length: int) -> bool:
        """One frame into RX chains, header first. False: no room (nothing
        written, the chains taken are kept for next time)."""
        header = self.header
        need = header + length
        first = self._take()
        if first is None:
            return False
        room = first.writable_len
        if not self.mrg:
            if room < need:
                self._used.append((first.head, 0))
                self.dropped += 1
                return True
            chains = [first]
        else:
            while room < header:  # not even the header fits: refuse it
                self._used.append((first.head, 0))
                self.errors += 1
                nxt = self._take()
                if nxt is None:
                    return False
                first, room = nxt, nxt.writable_len
            chains = [first]
            while room < need:
                chain = self._take()
                if chain is None:
                    self._give_back(chains)
                    return False
                if chain.writable_len == 0:
                    self._used.append((chain.head, 0))
                    self.errors += 1
                    continue
                chains.append(chain)
                room += chain.writable_len
        count = len(chains)
        if count == 1:
            views = first.writable_buffers()
            dst = views[0]
            if len(views) == 1 and len(src) == 1 and header == HEADER_SIZE:
                _HEADER_V1.pack_into(dst, 0, 0, 0, 0, 0, 0, 0, 1)
                dst[header:need] = src[0]
            else:
                _scatter(views, 0, (self._header_bytes(1), *src))
            self._used.append((first.head, need))
            if self.log:
                first.mark_written(need)
        else:
            views = [v for c in chains for v in c.writable_buffers()]
            _scatter(views, 0, (self._header_bytes(count), *src))
            left = need
            for chain in chains:
                n = min(chain.writable_len, left)
                self._used.append((chain.head, n))
                if self.log:
                    chain.mark_written(n)
                left -= n
        self.frames += 1
        self.size += length
        return True

    def flush(self) -> None:
        """Return the per-chain path's used entries (one publication), and
        signal the driver if it wants an interrupt."""
        if self._used and self.ring is not None:
            self.ring.add_used_many(self._used)
            self._used = []
            self.ring.signal_if_needed()
