# The data path's loops behind VringState.drain and drain_batches: pop,
# serve, complete with one publication and one fence, signal as the driver
# asks, until the ring is empty (docs/design.md, notification strategy).
#
# Rules of this module:
# - Called under an exclusive hold: `lease` is the hold's memory lease, and
#   the engine cannot change meanwhile (that takes the ring's lock), so the
#   loops call it directly when the queue adds nothing to its pops and
#   completions (no inflight tracker). With a tracker they go through the
#   queue, and finish its record of each completion (settle) after the
#   driver was signalled.
# - Every completion is on the snapshot its chains came from (the lease
#   still holds it); the next pop moves to a new table if one came, and the
#   calls are chosen again for it (the queue may add to them on one
#   snapshot and not on another).
# - An empty ring with kicks on ends a loop: the avail_event the last pop
#   left (or a NO_NOTIFY never set) is the re-arm, and the completion's
#   fence orders it before the last look at avail.idx (§5.4 rule 6).

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vubackend.memory import GuestMemory, MemoryLease
    from vubackend.vring._chain import ChainBatch, DescriptorChain
    from vubackend.vring._queue import Queue

__all__ = ["drain_batches", "drain_chains"]


def drain_chains(
    lease: MemoryLease,
    queue: Queue,
    signal_driver: Callable[[], None],
    serve: Callable[[DescriptorChain], int],
    busy_poll: float,
    max_chains: int | None,
) -> int:
    """The loop of ``VringState.drain``; returns the chains served."""
    limit = queue.size if max_chains is None else max_chains
    if limit <= 0:
        return 0
    mem = lease.current()
    pop, complete, settle = _chain_ops(queue, mem)
    served = 0
    if busy_poll:
        queue.disable_notification(mem)
    while True:
        chains = pop(mem, limit)
        if chains:
            if len(chains) == 1:
                chain = chains[0]
                flat = [chain.head, serve(chain)]
            else:
                flat = []
                for chain in chains:
                    flat.append(chain.head)
                    flat.append(serve(chain))
            # One publication, one fence, then: interrupt? more work?
            signal, more = complete(mem, flat)
            served += len(chains)
            if signal:
                signal_driver()
            if settle is not None:
                settle()
            if not more and not busy_poll:
                return served
        elif not busy_poll or not _idle(lease, queue, busy_poll):
            return served
        new = lease.current()  # a new table, if one came meanwhile
        if new is not mem:
            mem = new
            pop, complete, settle = _chain_ops(queue, mem)


def _chain_ops(
    queue: Queue, mem: GuestMemory
) -> tuple[
    Callable[[GuestMemory, int], list[DescriptorChain]],
    Callable[[GuestMemory, list[int]], tuple[bool, bool]],
    Callable[[], None] | None,
]:
    # The engine's own calls when the queue adds nothing to them on this
    # snapshot; else the queue's, and its settle after each signal.
    engine = queue.plain_engine(mem)
    if engine is not None:
        return engine.pop, engine.complete, None
    return queue.pop_chains, queue.complete, queue.settle


def _batch_ops(
    queue: Queue, mem: GuestMemory
) -> tuple[
    Callable[[GuestMemory, int], list[ChainBatch]],
    Callable[[GuestMemory, ChainBatch, int], tuple[bool, bool]],
    Callable[[], None] | None,
]:
    engine = queue.plain_engine(mem)
    if engine is not None:
        return engine.pop_batches, engine.complete_batch, None
    return queue.pop_batches, queue.complete_batch, queue.settle


def drain_batches(
    lease: MemoryLease,
    queue: Queue,
    signal_driver: Callable[[], None],
    serve: Callable[[ChainBatch], int],
    busy_poll: float,
    max_chains: int | None,
    budget: int | None,
) -> int:
    """The loop of ``VringState.drain_batches``; returns the chains taken."""
    limit = queue.size if max_chains is None else max_chains
    if limit <= 0:
        return 0
    mem = lease.current()
    pop, complete, settle = _batch_ops(queue, mem)
    served = 0
    if busy_poll:
        queue.disable_notification(mem)
    while True:
        more = False
        for batch in pop(mem, limit):
            taken = serve(batch)
            count = len(batch)
            if not 0 <= taken <= count:
                raise ValueError(f"serve took {taken} chains of a batch of {count}")
            if taken:
                # The batch's records straight to the used ring: one
                # publication, one fence, the driver's word and "more".
                signal, more = complete(mem, batch, taken)
                served += taken
                if signal:
                    signal_driver()
                if settle is not None:
                    settle()
            if taken < count:
                return served  # the rest is the caller's
        stop = not more or (budget is not None and served >= budget)
        if stop and (more or not busy_poll or not _idle(lease, queue, busy_poll)):
            return served
        new = lease.current()  # a new table, if one came meanwhile
        if new is not mem:
            mem = new
            pop, complete, settle = _batch_ops(queue, mem)


def _idle(lease: MemoryLease, queue: Queue, busy_poll: float) -> bool:
    # The ring is empty with kicks off: poll it for up to busy_poll seconds;
    # then kicks back on and one more look (a chain that came in between
    # would wait for a kick the driver suppressed). True: a chain came, go
    # on (kicks off again).
    mem = lease.current()
    if queue.poll_available(mem, busy_poll):
        return True
    if not queue.enable_notification(mem):
        return False
    queue.disable_notification(mem)
    return True
