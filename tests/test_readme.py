"""The README's examples work as printed."""

from __future__ import annotations

import threading
from pathlib import Path

from vubackend.daemon import VhostUserDaemon
from vubackend.frontend import Frontend, RngDriver
from vubackend.protocol import VirtioFeatures

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index(heading)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_own_device_example_serves_random_bytes(tmp_path: Path) -> None:
    code = python_block_after("## Your own device in 30 lines")
    serve_line = 'VhostUserDaemon("rng", Rng()).serve("/tmp/rng.sock")'
    assert serve_line in code
    namespace: dict[str, object] = {}
    exec(compile(code.replace(serve_line, ""), "README.md", "exec"), namespace)
    device_class = namespace["Rng"]
    assert isinstance(device_class, type)
    daemon = VhostUserDaemon("rng", device_class())
    path = tmp_path / "rng.sock"
    server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
    server.start()
    try:
        with Frontend.connect(path, retry_for=5.0, timeout=5.0) as fe:
            fe.handshake(int(VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX))
            fe.create_memory([1 << 20])
            rng = RngDriver(fe, fe.setup_queue(0, 16))
            fe.start_device()
            first, second = rng.read(64), rng.read(64)
    finally:
        daemon.close()
        server.join(timeout=10)
    assert len(first) == len(second) == 64
    assert first != second
