"""benchmarks/energy_replay.py: recorded curves replayed through the real schedulers.

The replay must drive Ray's ASHAScheduler and SM2Scheduler as Tune's controller
does, stop experiments at the budget as energy.py's Stopper does, and count the
energy to a target the same way; recording must go through the real runner."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from argparse import Namespace
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "energy_replay", Path(__file__).resolve().parents[1] / "benchmarks" / "energy_replay.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

KEY = bench.CPU_KEY
ARGS = Namespace(max_epochs=8, grace=1.0, reduction_factor=3.0, energy_weight=0.05)


def trace(i: int, curve: list[float], per_epoch: float, final: float | None = None) -> dict:
    """A configuration whose accuracy after epoch k is ``curve[k-1]``, each epoch
    costing ``per_epoch``; its final score is the last accuracy unless given."""
    reports = [
        {"epoch": k + 1, "score": acc, KEY: per_epoch * (k + 1), bench.JOULE_KEY: None}
        for k, acc in enumerate(curve)
    ]
    return {
        "config": {"c": i},
        "reports": reports,
        "final": {
            "score": curve[-1] if final is None else final,
            KEY: per_epoch * len(curve) + 0.01,
            bench.JOULE_KEY: None,
        },
        "energy_source": "none",
    }


def random_traces(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        epochs = rng.randint(2, 8)
        start, rate = rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.1)
        curve = [min(0.99, start + rate * k + rng.uniform(-0.02, 0.02)) for k in range(epochs)]
        out.append(trace(i, curve, per_epoch=rng.choice([0.1, 0.3, 0.9])))
    return out


def test_replay_stops_at_the_budget_and_counts_energy_in_run_order():
    stream = [trace(0, [0.5, 0.6], 1.0), trace(1, [0.7, 0.9, 0.95], 1.0), trace(2, [0.99], 1.0)]
    fifo = bench.replay(stream, None, KEY, math.inf, limit=2)
    assert [r["stopped"] for r in fifo] == [False, False] and len(fifo) == 2
    assert [r["spent"] for r in fifo] == pytest.approx([2.01, 3.01])
    assert bench.first_at(fifo, 0.9) == (pytest.approx(2.01 + 2.0), 1)
    assert bench.first_at(fifo, 0.999) == (None, None)  # never reached: None, not 0
    assert bench.best_within(fifo, 3.5) == pytest.approx(0.7)
    # A budget of 3: the experiment ends at the first result that reaches it,
    # inside the second configuration, which counts as stopped.
    capped = bench.replay(stream, None, KEY, 3.0)
    assert len(capped) == 2 and capped[1]["stopped"] and capped[1]["spent"] == pytest.approx(1.0)
    assert bench.oracle_to_target(stream, KEY, 0.9) == pytest.approx(1.0 + 2.0)
    assert bench.oracle_to_target(stream, KEY, 0.9, budget=2.5) is None


def test_sm2_without_its_energy_term_decides_exactly_as_ray_asha():
    """Cross-check of SM2's halving core against Ray's ASHA on the same rungs."""
    traces = random_traces(40, seed=3)
    for s in range(5):
        stream = traces[:]
        random.Random(s).shuffle(stream)
        asha = bench.replay(stream, bench.make_scheduler("asha", ARGS, KEY), KEY, 25.0)
        sm2 = bench.replay(stream, bench.make_scheduler("sm2@0", ARGS, KEY), KEY, 25.0)
        assert [(r["spent"], r["stopped"]) for r in sm2] == [
            (r["spent"], r["stopped"]) for r in asha
        ]
        assert any(r["stopped"] for r in asha)  # the check is not vacuous


def test_the_energy_term_stops_the_configuration_that_costs_more_for_the_same_accuracy():
    # Two cheap configurations set rung 1; a third costs 10x per epoch and is
    # as accurate as the better cheap one. ASHA keeps it (above the cutoff, and
    # again at rung 3) and trains it for 8 epochs; SM2 with a noticeable energy
    # weight stops it after its first epoch. The fourth reaches the target.
    # Kind (a), deterministic: hand-made curves through both schedulers; the energy
    # to the target is arithmetic on them (8.82 against 1.81, exact to rounding).
    stream = [
        trace(0, [0.60, 0.70, 0.80, 0.85], 0.1),
        trace(1, [0.50, 0.55, 0.58, 0.60], 0.1),
        trace(2, [0.61, 0.70, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86], 1.0),
        trace(3, [0.80, 0.90, 0.96], 0.1),
    ]
    asha = bench.replay(stream, bench.make_scheduler("asha", ARGS, KEY), KEY, math.inf)
    sm2 = bench.replay(stream, bench.make_scheduler("sm2@0.1", ARGS, KEY), KEY, math.inf)
    assert not asha[2]["stopped"] and asha[2]["spent"] > 8
    assert sm2[2]["stopped"] and sm2[2]["spent"] == pytest.approx(1.0)
    to_asha, _ = bench.first_at(asha, 0.95)
    to_sm2, _ = bench.first_at(sm2, 0.95)
    assert to_sm2 < to_asha - 6
    parts = bench.spending(asha, KEY, 0.95, milestones=[1.0, 3.0])
    assert parts["first_report"] == pytest.approx(0.1 + 0.1 + 1.0)
    assert sum(parts.values()) == pytest.approx(sum(r["spent"] for r in asha[:3]))


def test_relation_reports_rank_correlation_and_undefined_cases():
    rising = [trace(i, [0.5 + 0.1 * i], per_epoch=0.1 * (i + 1)) for i in range(4)]
    rel = bench.relation(rising, KEY)
    assert rel["spearman_energy_per_epoch_vs_final"] == pytest.approx(1.0)
    flat = [trace(i, [0.7], per_epoch=0.1 * (i + 1)) for i in range(4)]
    assert bench.relation(flat, KEY)["spearman_energy_per_epoch_vs_final"] is None


def test_record_then_replay_through_the_real_runner(tmp_path):
    traces = tmp_path / "traces.jsonl"
    common = ["--max-epochs", "2"]
    record = ["record", "--configs", "4", "--n-samples", "200", "--image-size", "8"]
    assert bench.main([*record, *common, "--out", str(traces)]) == 0
    assert not list(tmp_path.glob("*.partial"))
    meta, recorded = bench.load_traces(traces)
    assert meta["settings"]["configs"] == 4 and len(recorded) == 4
    for t in recorded:
        assert [r["epoch"] for r in t["reports"]] == list(
            range(1, t["config"]["train"]["epochs"] + 1)
        )
        assert all(r[KEY] > 0 for r in t["reports"])
        energies = [r[KEY] for r in t["reports"]] + [t["final"][KEY]]
        assert energies == sorted(energies)  # energy so far only grows
        assert 0.0 <= t["final"]["score"] <= 1.0
    key, unit = bench.energy_unit(recorded)
    if key == KEY:  # no meter here: labelled as CPU time, never as joules
        assert "joule" not in unit.lower() and unit.startswith("CPU-s")
    other = tmp_path / "other.jsonl"  # a second pool (here the same curves)
    other.write_text(traces.read_text())
    out = tmp_path / "replay"
    args = ["replay", "--traces", str(traces), str(other), "--streams", "3", "--trials", "2"]
    assert bench.main(args + common + ["--energy-weights", "0.05", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["summary"]) == {"fifo", "asha", "sm2@0.05", "oracle"}
    assert len(data["streams"]) == 3 and data["relation"]["configs"] == 8  # pooled
    assert sorted(data["by_pool"]) == sorted([str(traces), str(other)])
    assert all(p["configs"] == 4 for p in data["by_pool"].values())
    text = out.with_suffix(".md").read_text()
    assert "| asha |" in text and "| oracle |" in text and "| `other.jsonl` | 4 |" in text


def test_bad_trace_files_are_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"config": {}}) + "\n")
    with pytest.raises(SystemExit, match="not a trace file"):
        bench.load_traces(bad)
    bad.write_text(json.dumps({"meta": {}}) + "\n")
    with pytest.raises(SystemExit, match="no traces"):
        bench.load_traces(bad)


def test_record_stops_starting_configurations_after_max_seconds(tmp_path):
    traces = tmp_path / "none.jsonl"
    args = ["record", "--configs", "3", "--n-samples", "200", "--image-size", "8"]
    assert bench.main([*args, "--max-seconds", "0", "--out", str(traces)]) == 0
    lines = traces.read_text().splitlines()
    assert len(lines) == 1 and "meta" in json.loads(lines[0])  # complete, and empty
    with pytest.raises(SystemExit, match="no traces"):
        bench.load_traces(traces)
