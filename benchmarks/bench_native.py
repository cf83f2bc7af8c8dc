"""Micro-benchmark of vubackend._native against plain Python on the same buffer.

Rules: ratios, not absolute times (docs/design.md, "Performance"): each
native operation is timed against its nearest plain-Python equivalent in the
same run, alternating the two, best of several rounds. Run it with
``python benchmarks/bench_native.py [--rounds N]``. It prints one table; a
ratio above 1 means the native call is slower than the Python one (the native
call pays for bounds checks, atomicity and a GIL release; Python pays for
none of these and is not atomic).
"""

from __future__ import annotations

import argparse
import mmap
import struct
import timeit
from typing import TYPE_CHECKING

from vubackend._native import AtomicView

if TYPE_CHECKING:
    from collections.abc import Mapping

_OFFSET = 64
_LEN = 64


def _best_ns(stmt: str, env: Mapping[str, object], number: int) -> float:
    timer = timeit.Timer(stmt, globals=dict(env))
    return min(timer.repeat(repeat=3, number=number)) / number * 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations (5)")
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing")
    args = parser.parse_args(argv)

    m = mmap.mmap(-1, mmap.PAGESIZE)
    ba = bytearray(mmap.PAGESIZE)
    view = AtomicView(m)
    env: dict[str, object] = {
        "view": view,
        "ba": ba,
        "m": m,
        "u16": struct.Struct("<H").unpack_from,
        "off": _OFFSET,
        "n": _LEN,
    }
    # (name, native statement, plain-Python statement)
    cases = [
        ("load_u16", "view.load_u16(off)", "u16(ba, off)[0]"),
        ("store_u16", "view.store_u16(off, 7)", "ba[off:off + 2] = b'\\x07\\x00'"),
        ("or_u8", "view.or_u8(off, 4)", "old = ba[off]; ba[off] = old | 4"),
        ("load_u8", "view.load_u8(off)", "ba[off]"),
        ("read 64 B", "view.read(off, n)", "bytes(ba[off:off + n])"),
        ("read 64 B (mmap)", "view.read(off, n)", "m[off:off + n]"),
        ("write 64 B", "view.write(off, ba[:n])", "m[off:off + n] = ba[:n]"),
    ]
    best: dict[str, tuple[float, float]] = {}
    try:
        for _ in range(args.rounds):
            for name, native, plain in cases:
                t_native = _best_ns(native, env, args.number)
                t_plain = _best_ns(plain, env, args.number)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], t_native), min(old[1], t_plain))
    finally:
        view.release()
        m.close()

    print(f"{'operation':<18} {'native ns':>10} {'python ns':>10} {'ratio':>7}")
    for name, _, _ in cases:
        t_native, t_plain = best[name]
        print(
            f"{name:<18} {t_native:>10.1f} {t_plain:>10.1f} {t_native / t_plain:>7.2f}"
        )


if __name__ == "__main__":
    main()
