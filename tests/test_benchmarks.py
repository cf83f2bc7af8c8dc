"""The benchmark harness's bookkeeping (the runs themselves need QEMU, DPDK
and quiet CPUs: python -m benchmarks)."""

from __future__ import annotations

from pathlib import Path

from benchmarks._harness import Outcome, Scenario, compare, load, save, table


def scenario(name: str) -> Scenario:
    return Scenario(name, dict, dict, ["iops"], "ref")


def test_a_saved_run_compares_by_median_ratio(tmp_path: Path) -> None:
    before = [
        Outcome("a", "ref", [{"iops": 50.0}, {"iops": 60.0}], [{"iops": 100.0}] * 2),
        Outcome("gone", "ref", [{"iops": 1.0}], [{"iops": 1.0}]),
    ]
    path = tmp_path / "run.json"
    save(before, path)
    assert load(path) == before
    now = [
        Outcome("a", "ref", [{"iops": 90.0}, {"iops": 88.0}], [{"iops": 100.0}] * 2),
        Outcome("new", "ref", [{"iops": 3.0}], [{"iops": 2.0}]),
    ]
    lines = compare(now, [scenario("a"), scenario("new")], load(path)).splitlines()
    assert lines[2] == "| a | iops | 0.55 | 0.89 | 1.62x |"
    assert lines[3] == "| new | iops | - | 1.50 | - |"
    assert "| 0.50 0.60 | **0.55** |" in table(before[:1], [scenario("a")])
