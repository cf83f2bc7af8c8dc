# Worker threads: one per entry of queues_per_thread(), each waiting on its
# own select.epoll for kicks, an exit event and custom listeners.
#
# Token layout
# ------------
# Python's epoll reports fds, not user data, so each worker keeps a map from
# fd to token, written only under its lock:
#   0 .. len(vrings)-1   the kick fd of the worker's n-th ring (its position
#                        in the worker's list, as the seed computes it)
#   num_queues           reserved (the seed's exit token; never registered)
#   > num_queues         custom listeners (register_listener), the device's
#                        own tokens, passed to handle_event as they are.
# The exit eventfd has a private token (-1).
#
# Kick fds are registered only while their ring is started and enabled; a
# kick written meanwhile stays pending in the eventfd and fires when the fd
# is registered again (no lost kicks, seed fix #343).
#
# Kick fds are edge-triggered (EPOLLET) and never read: every write to an
# eventfd wakes its waiters, so each kick is an event of its own, and the
# counter (which would take millennia to saturate) needs no read() on the
# way to the device. A kick that arrives while the device runs is the next
# event, so none is lost; one that arrived while the fd was unregistered
# is reported when it is registered again (epoll checks readiness then).

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    from vubackend.daemon._backend import VhostUserBackend
    from vubackend.vring import VringT

__all__ = ["VringEpollHandler"]

log = logging.getLogger("vubackend.daemon")

_EXIT_TOKEN: Final = -1


@final
class VringEpollHandler:
    """The epoll loop of one worker thread (the seed's VringEpollHandler).

    Devices reach it through ``VhostUserDaemon.get_epoll_handlers()`` to add
    their own fds with :meth:`register_listener`.
    """

    def __init__(
        self,
        backend: VhostUserBackend,
        vrings: Sequence[VringT],
        thread_id: int,
        num_queues: int,
        on_failure: Callable[[int, BaseException], None],
    ) -> None:
        self._backend = backend
        self._vrings = tuple(vrings)
        self._thread_id = thread_id
        self._num_queues = num_queues
        self._on_failure = on_failure
        self._epoll = select.epoll()
        self._tokens: dict[int, int] = {}
        self._lock = threading.Lock()
        self._dispatch_lock = threading.Lock()
        self._exit_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._device_exit = backend.exit_event(thread_id)
        self._add(self._exit_fd, select.EPOLLIN, _EXIT_TOKEN)
        if self._device_exit is not None:
            self._add(self._device_exit, select.EPOLLIN, _EXIT_TOKEN)
        self._thread = threading.Thread(
            target=self._run, name=f"vring_worker_{thread_id}", daemon=True
        )

    @property
    def thread_id(self) -> int:
        return self._thread_id

    @property
    def vrings(self) -> tuple[VringT, ...]:
        return self._vrings

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------ registration

    def _add(self, fd: int, events: int, token: int) -> None:
        with self._lock:
            if fd in self._tokens:
                raise FileExistsError(errno.EEXIST, f"fd {fd} is already registered")
            # The token first: the worker may see the fd's first event before
            # register() returns, and an edge-triggered event is not repeated.
            self._tokens[fd] = token
            try:
                self._epoll.register(fd, events)
            except BaseException:
                del self._tokens[fd]
                raise

    def _remove(self, fd: int) -> None:
        with self._lock:
            if self._tokens.pop(fd, None) is None:
                return
            # The fd may already be closed, which removed it from the set.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def register_listener(self, fd: int, events: int, data: int) -> None:
        """Watch ``fd`` for ``events``; handle_event receives ``data``.

        Raises:
            ValueError: ``data`` is a token reserved for rings (``<=
                num_queues``).
            FileExistsError: ``fd`` is already registered.
        """
        if data <= self._num_queues:
            raise ValueError(
                f"listener token {data} is reserved; use one above {self._num_queues}"
            )
        self._add(fd, events, data)

    def unregister_listener(self, fd: int) -> None:
        """Stop watching ``fd`` (registered with register_listener)."""
        self._remove(fd)

    def register_kick(self, position: int, fd: int) -> None:
        """Watch a ring's kick fd (edge-triggered); idempotent."""
        with self._lock:
            if self._tokens.get(fd) == position:
                return
        self._add(fd, select.EPOLLIN | select.EPOLLET, position)

    def unregister_kick(self, fd: int) -> None:
        """Stop watching a ring's kick fd; idempotent."""
        self._remove(fd)

    # ------------------------------------------------------------ loop

    def stop(self) -> None:
        """Ask the worker to end and wait for it (not from the worker)."""
        os.eventfd_write(self._exit_fd, 1)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def close(self) -> None:
        """Stop the worker and release its epoll and exit eventfd."""
        if self._thread.ident is not None:
            self.stop()
        self._epoll.close()
        os.close(self._exit_fd)

    def _run(self) -> None:
        poll = self._epoll.poll
        tokens = self._tokens
        dispatch_lock = self._dispatch_lock
        vrings = self._vrings
        nrings = len(vrings)
        handle_event = self._backend.handle_event
        thread_id = self._thread_id
        while True:
            try:
                events = poll()
            except OSError as exc:  # EINTR is retried by Python (PEP 475)
                self._on_failure(self._thread_id, exc)
                return
            for fd, evset in events:
                # One event at a time under the dispatch lock, so that the
                # request thread can wait out the event in progress before it
                # stops a ring (paused()); the token is looked up under it, so
                # an event for a kick fd unregistered meanwhile is dropped.
                # (One dict.get is atomic; _lock orders the writers only.)
                with dispatch_lock:
                    token = tokens.get(fd)
                    if token is None:
                        continue  # unregistered while we were waking up
                    if token == _EXIT_TOKEN:
                        return
                    try:
                        # A kick (edge-triggered: nothing to read); a disabled
                        # ring's kick is not handed to the device.
                        if token < nrings and not vrings[token].note_kick():
                            continue
                        handle_event(token, evset, vrings, thread_id)
                    except Exception as exc:
                        log.exception(
                            "worker %d: the device failed to handle event %d; "
                            "this worker stops",
                            self._thread_id,
                            token,
                        )
                        self._on_failure(self._thread_id, exc)
                        return

    @contextlib.contextmanager
    def paused(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold off event dispatch, after the event in progress (if any)
        finishes. A device that blocks longer than ``timeout`` (for example
        waiting on the backend channel for a front-end that waits for us)
        is logged and not waited for, rather than deadlocking."""
        if threading.current_thread() is self._thread:
            yield
            return
        acquired = self._dispatch_lock.acquire(timeout=timeout)
        if not acquired:
            log.warning(
                "worker %d: the device is still handling an event after %.0f s; "
                "going on without waiting",
                self._thread_id,
                timeout,
            )
        try:
            yield
        finally:
            if acquired:
                self._dispatch_lock.release()
