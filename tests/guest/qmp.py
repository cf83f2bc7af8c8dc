"""A small QMP client (QEMU's JSON monitor protocol over a UNIX socket),
enough for the migration tests: connect, negotiate, run commands, wait for a
migration to finish. Events are kept in :attr:`QMP.events`."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Self

JSON = dict[str, Any]


class QMPError(AssertionError):
    """QEMU answered a command with an error, or did not answer in time."""


class QMP:
    """A QMP connection to one QEMU process.

    Args:
        path: the socket QEMU listens on (``-qmp unix:PATH,server=on,wait=off``).
        timeout: seconds to wait for QEMU to listen, and for each answer.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.events: list[JSON] = []
        self._timeout = timeout
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"QEMU does not listen on {path}") from None
                time.sleep(0.05)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> JSON:
        try:
            line = self._file.readline()
        except OSError as exc:
            raise QMPError(f"reading from QEMU: {exc}") from exc
        if not line:
            raise QMPError("QEMU closed the QMP connection")
        message: JSON = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value.

        Raises:
            QMPError: QEMU answered with an error.
        """
        request: JSON = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                error = message["error"]
                raise QMPError(f"{name}: {error.get('class')}: {error.get('desc')}")
            elif "return" in message:
                return message["return"]

    def wait_migration(self, *, timeout: float, poll: float = 0.1) -> JSON:
        """Poll ``query-migrate`` until the migration completed.

        Returns:
            The last answer (``status`` ``completed``).

        Raises:
            QMPError: it failed, was cancelled, or is not done in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            info: JSON = self.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {info}")
            if time.monotonic() > deadline:
                raise QMPError(f"migration not done after {timeout} s: {info}")
            time.sleep(poll)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
