"""benchmarks/energy.py's figures from recorded runs (no Ray: the definitions only).

The Tune runs themselves are exercised by tests/tune/test_sm2.py; here the
arithmetic behind the published table: cumulative energy in run order, energy
to a target, accuracy within a budget, and the same-stream check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "energy_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "energy.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

KEY = "total_cpu_seconds"


def trial(config: int, *rows: tuple[float | None, float], final: bool = True) -> dict:
    """Progress rows (accuracy, energy so far); the last one final when ``final``."""
    results = [{"score": acc, KEY: e, "epoch": i + 1} for i, (acc, e) in enumerate(rows)]
    if final:
        results[-1]["memoized_stages"] = 0
    return {"config": {"c": config}, "results": results}


def run(method: str, *trials: dict) -> dict:
    return {"method": method, "seed": 0, "wall_s": 1.0, "trials": list(trials)}


def test_energy_is_cumulative_in_run_order_and_targets_count_any_reported_accuracy():
    r = run(
        "sm2",
        trial(1, (0.5, 1.0), (0.7, 2.0)),
        trial(2, (0.6, 3.0), final=False),
        trial(3, (0.8, 0.5), (0.95, 1.5)),
    )
    assert bench.curve(r, KEY) == [(1.0, 0.5), (2.0, 0.7), (5.0, 0.6), (5.5, 0.8), (6.5, 0.95)]
    row = bench.summarize(r, KEY, targets=[0.7, 0.9, 0.99], budget=5.5)
    assert row["energy_to_target"] == [2.0, 6.5, None]  # None: never reached, not 0
    assert row["best_within_budget"] == 0.8 and row["best"] == 0.95
    assert row["total_energy"] == pytest.approx(6.5)
    assert row["stopped_early"] == 1 and row["trials"] == 3
    assert row["configs_within_budget"] == 3 and row["epochs_trained"] == 5
    tiny = bench.summarize(r, KEY, targets=[0.7], budget=0.5)
    assert tiny["best_within_budget"] is None and tiny["configs_within_budget"] == 1


def test_same_stream_and_tables():
    a = run("fifo", trial(1, (0.5, 1.0)), trial(2, (0.5, 1.0)))
    b = run("asha", trial(1, (0.5, 1.0)), trial(2, (0.5, 1.0)), trial(3, (0.5, 1.0)))
    c = run("sm2", trial(2, (0.5, 1.0)))
    assert bench.same_stream([a, b]) and not bench.same_stream([a, c])
    rows = [bench.summarize(x, KEY, [0.5, 0.9], 1.5) for x in (a, b)]
    text = bench.tables(rows, "CPU-s (process CPU time; no energy meter here)", [0.5, 0.9])
    assert "| method | energy to target q0.5 (CPU-s) | reached q0.5 |" in text
    assert "| fifo | 1 | 1/1 | - | 0/1 |" in text
    assert "not reached" in text and "joule" not in text.lower()
    assert bench.quantile([0.1, 0.2, 0.3, 0.4], 0.75) == pytest.approx(0.325)
