"""The A/B harness of ``python -m benchmarks``: each scenario runs ours and
a reference alternately (A B, then B A, ...) for several rounds in the same
invocation, and reports medians and the ratio ours / reference per round.
These machines are noisy and bimodal, so only ratios measured in the same
round mean anything (docs/design.md, "Performance")."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Metrics = dict[str, float]


@dataclass
class Scenario:
    """Two sides measured with the same metrics.

    ``ours()`` and ``reference()`` each run once and return their metrics;
    ``ratios`` names the metrics compared (higher is better); the other
    metrics are reported as they are (CPU %, kicks/s...).

    A scenario that can measure both sides side by side instead (both
    served at once, measured in alternation within seconds) gives
    ``paired(rounds)``, which returns the rounds of each side; ``ours`` and
    ``reference`` are then not called.
    """

    name: str
    ours: Callable[[], Metrics]
    reference: Callable[[], Metrics]
    ratios: Sequence[str]
    reference_name: str
    units: dict[str, str] = field(default_factory=dict)
    paired: Callable[[int], tuple[list[Metrics], list[Metrics]]] | None = None


@dataclass
class Outcome:
    scenario: str
    reference: str
    ours: list[Metrics]
    theirs: list[Metrics]

    def ratios(self, metric: str) -> list[float]:
        return [
            a[metric] / b[metric] if b.get(metric) else float("nan")
            for a, b in zip(self.ours, self.theirs, strict=True)
        ]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(scenario: Scenario, rounds: int, log: Callable[[str], None] = print) -> Outcome:
    """Alternate the two sides for ``rounds`` rounds (A B, B A, ...)."""
    outcome = Outcome(scenario.name, scenario.reference_name, [], [])
    if scenario.paired is not None:
        start = time.monotonic()
        outcome.ours, outcome.theirs = scenario.paired(rounds)
        for r, (a, b) in enumerate(zip(outcome.ours, outcome.theirs, strict=True)):
            for side, metrics in (("ours", a), ("reference", b)):
                shown = ", ".join(f"{k}={v:,.3g}" for k, v in metrics.items())
                log(f"  {scenario.name} round {r + 1} {side}: {shown}")
        log(f"  ({time.monotonic() - start:.1f} s)")
        return outcome
    for r in range(rounds):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        for side in order:
            start = time.monotonic()
            metrics = scenario.ours() if side == "ours" else scenario.reference()
            (outcome.ours if side == "ours" else outcome.theirs).append(metrics)
            shown = ", ".join(f"{k}={v:,.3g}" for k, v in metrics.items())
            log(
                f"  {scenario.name} round {r + 1} {side}: {shown} "
                f"({time.monotonic() - start:.1f} s)"
            )
    return outcome


def table(outcomes: Sequence[Outcome], scenarios: Sequence[Scenario]) -> str:
    """Markdown table: per scenario and compared metric, the medians, the
    ratio per round and its median; then the other metrics of ours."""
    lines = [
        "| scenario | metric | vubackend (median) | reference (median) "
        "| ratio per round | median ratio |",
        "|---|---|---|---|---|---|",
    ]
    by_name = {s.name: s for s in scenarios}
    for outcome in outcomes:
        scenario = by_name[outcome.scenario]
        for metric in scenario.ratios:
            unit = scenario.units.get(metric, "")
            ours = median([m[metric] for m in outcome.ours])
            theirs = median([m[metric] for m in outcome.theirs])
            per_round = " ".join(f"{x:.2f}" for x in outcome.ratios(metric))
            lines.append(
                f"| {outcome.scenario} | {metric}{unit} | {ours:,.4g} "
                f"| {theirs:,.4g} ({outcome.reference}) | {per_round} "
                f"| **{median(outcome.ratios(metric)):.2f}** |"
            )
        extra = sorted({k for m in outcome.ours for k in m} - set(scenario.ratios))
        for metric in extra:
            unit = scenario.units.get(metric, "")
            ours = median([m[metric] for m in outcome.ours if metric in m])
            theirs_values = [m[metric] for m in outcome.theirs if metric in m]
            shown = f"{median(theirs_values):,.4g}" if theirs_values else "-"
            lines.append(
                f"| {outcome.scenario} | {metric}{unit} | {ours:,.4g} | {shown} | | |"
            )
    return "\n".join(lines)


def save(outcomes: Sequence[Outcome], path: Path) -> None:
    """Write the raw rounds as JSON, to compare runs over time."""
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": [
            {
                "scenario": o.scenario,
                "reference": o.reference,
                "ours": o.ours,
                "reference_rounds": o.theirs,
            }
            for o in outcomes
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def load(path: Path) -> list[Outcome]:
    """The outcomes of a run written by :func:`save`."""
    record = json.loads(path.read_text())
    return [
        Outcome(r["scenario"], r["reference"], r["ours"], r["reference_rounds"])
        for r in record["results"]
    ]


def compare(
    outcomes: Sequence[Outcome],
    scenarios: Sequence[Scenario],
    before: Sequence[Outcome],
) -> str:
    """Markdown table: per compared metric, the median ratio to the
    reference in an earlier run (``before``, from :func:`load`) and now.
    Ratios, not absolute figures: only they survive another machine or
    another period of this one."""
    lines = [
        "| scenario | metric | median ratio before | now | change |",
        "|---|---|---|---|---|",
    ]
    earlier = {o.scenario: o for o in before}
    by_name = {s.name: s for s in scenarios}
    for outcome in outcomes:
        old = earlier.get(outcome.scenario)
        for metric in by_name[outcome.scenario].ratios:
            now = median(outcome.ratios(metric))
            then = float("nan")
            if old is not None and all(metric in m for m in old.ours + old.theirs):
                then = median(old.ratios(metric))
            known = then == then and then > 0  # not NaN: in both runs
            shown = f"{then:.2f}" if known else "-"
            change = f"{now / then:.2f}x" if known else "-"
            lines.append(
                f"| {outcome.scenario} | {metric} | {shown} | {now:.2f} | {change} |"
            )
    return "\n".join(lines)
