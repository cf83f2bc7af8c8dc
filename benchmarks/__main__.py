"""``python -m benchmarks``: every scenario against its reference in the
same invocation, alternating, several rounds; a table of medians and of the
ratio per round, and the raw rounds as JSON (benchmarks/results/).

Usage: ``python -m benchmarks [--rounds N] [--only micro,blk-guest,blk-frontend,net]
[--json PATH] [--compare PATH]``; ``--compare benchmarks/baseline.json`` also
prints how each median ratio moved since the run the README shows. Needs the
packages of scripts/setup.sh (QEMU, qemu-storage-daemon, DPDK) and 2 CPUs:
backends run on CPU 0, frontends on 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _blk, _micro, _net
from benchmarks._harness import Outcome, Scenario, compare, load, run, save, table

GROUPS = ("micro", "blk-guest", "blk-frontend", "net")


def _scenarios(group: str, workdir: Path) -> list[Scenario]:
    if group == "micro":
        return _micro.scenarios()
    if group == "blk-guest":
        return [
            _blk.guest_scenario(workdir),
            _blk.guest_scenario(workdir, busy_poll_us=300),
        ]
    if group == "blk-frontend":
        return [_blk.frontend_scenario(workdir)]
    return _net.scenarios(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated of {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).parent / "results" / "latest.json",
        help="where to write the raw rounds",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="an earlier run's JSON (benchmarks/baseline.json: the README's run) "
        "to compare the median ratios with",
    )
    args = parser.parse_args(argv)
    before = load(args.compare) if args.compare is not None else None
    groups = [g for g in args.only.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown scenario group(s): {', '.join(sorted(unknown))}")
    outcomes: list[Outcome] = []
    scenarios: list[Scenario] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vubackend-bench-") as tmp:
        for group in groups:
            for scenario in _scenarios(group, Path(tmp)):
                print(f"== {scenario.name} vs {scenario.reference_name}", flush=True)
                scenarios.append(scenario)
                outcomes.append(
                    run(scenario, args.rounds, lambda s: print(s, flush=True))
                )
    print()
    print(table(outcomes, scenarios))
    if before is not None:
        print(f"\nCompared with {args.compare}:\n")
        print(compare(outcomes, scenarios, before))
    save(outcomes, args.json)
    print(
        f"\n{len(outcomes)} scenarios in {time.monotonic() - started:.0f} s; "
        f"raw rounds in {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
