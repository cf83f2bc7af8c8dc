# RwLock: a readers-writer lock (the standard library has none).
#
# Rules of this module:
# - Many readers or one writer. Built on one threading.Condition, whose
#   mutex is entered directly (`with self._mutex`): Condition.__enter__ is a
#   Python frame, and the uncontended paths here run on every ring call.
# - Phase-fair, so nobody starves: a reader that arrives while a writer holds
#   or waits for the lock waits; when that writer releases, every reader
#   that was waiting by then goes in before the next writer (a generation
#   counter tells them apart from readers that came later, and `_turn`
#   holds the writers back until they are all in). Writers thus get
#   priority over new readers, and waiting readers over the next writer.
# - Not reentrant, and a reader cannot upgrade to a writer (it would wait
#   for itself). Release from the thread that acquired.
# - The method names (acquire_read, release_write, ...) keep the verb first:
#   names ending in the verbs are reserved for memory-ordering calls, which
#   tests/test_source_rules.py checks for an ORDERING comment.

from __future__ import annotations

import threading
from typing import final

__all__ = ["RwLock"]


@final
class ReadSide:
    """``with lock.read:`` holds the lock shared."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RwLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        # The uncontended case inline (this runs on every kick); anything
        # else takes the full, phase-fair path.
        with lock._mutex:
            if not (lock._writer or lock._waiting_writers):
                lock._readers += 1
                return
        lock.acquire_read()

    def __exit__(self, *exc: object) -> None:
        lock = self._lock
        with lock._mutex:
            if lock._readers > 1 or (lock._readers == 1 and not lock._waiting_writers):
                lock._readers -= 1
                return
        lock.release_read()


@final
class WriteSide:
    """``with lock.write:`` holds the lock exclusively."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RwLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        with lock._mutex:
            if not (lock._writer or lock._readers or lock._turn):
                lock._writer = True
                return
        lock.acquire_write()

    def __exit__(self, *exc: object) -> None:
        lock = self._lock
        with lock._mutex:
            if lock._writer and not (lock._waiting_readers or lock._waiting_writers):
                lock._writer = False
                lock._generation += 1
                lock._turn = 0
                return
        lock.release_write()


@final
class RwLock:
    """A phase-fair readers-writer lock.

    Use ``with lock.read:`` / ``with lock.write:``, or the explicit
    acquire/release methods.
    """

    __slots__ = (
        "_cond",
        "_generation",
        "_mutex",
        "_readers",
        "_turn",
        "_waiting_readers",
        "_waiting_writers",
        "_writer",
        "read",
        "write",
    )

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._turn = 0
        # Bumped at every write release: readers waiting since before it may
        # go in ahead of writers that are waiting.
        self._generation = 0
        self.read = ReadSide(self)
        """Context manager for shared access."""
        self.write = WriteSide(self)
        """Context manager for exclusive access."""

    def acquire_read(self) -> None:
        """Block until the lock is held shared."""
        with self._mutex:
            if self._writer or self._waiting_writers:
                generation = self._generation
                self._waiting_readers += 1
                try:
                    while self._writer or (
                        self._waiting_writers and self._generation == generation
                    ):
                        self._cond.wait()
                except BaseException:
                    self._waiting_readers -= 1
                    # Interrupted: give up our turn so writers cannot wait
                    # for a reader that will never come.
                    self._turn = min(self._turn, self._waiting_readers)
                    self._cond.notify_all()
                    raise
                self._waiting_readers -= 1
                if self._turn > 0:
                    self._turn -= 1
                    if self._turn == 0:
                        self._cond.notify_all()
            self._readers += 1

    def release_read(self) -> None:
        """Release a shared hold.

        Raises:
            RuntimeError: the lock is not held shared.
        """
        with self._mutex:
            if self._readers <= 0:
                raise RuntimeError("release_read of a lock not held for reading")
            self._readers -= 1
            # Waking nobody is not free (Condition.notify_all); skip it.
            if self._readers == 0 and self._waiting_writers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Block until the lock is held exclusively."""
        with self._mutex:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers or self._turn:
                    self._cond.wait()
            except BaseException:
                self._waiting_writers -= 1
                self._cond.notify_all()
                raise
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        """Release an exclusive hold.

        Raises:
            RuntimeError: the lock is not held exclusively.
        """
        with self._mutex:
            if not self._writer:
                raise RuntimeError("release_write of a lock not held for writing")
            self._writer = False
            self._generation += 1
            # Every reader waiting now goes before the next writer.
            self._turn = self._waiting_readers
            if self._waiting_readers or self._waiting_writers:
                self._cond.notify_all()

    def __repr__(self) -> str:
        return (
            f"<RwLock readers={self._readers} writer={self._writer} "
            f"waiting_writers={self._waiting_writers}>"
        )
