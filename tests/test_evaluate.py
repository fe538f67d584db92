"""benchmarks/evaluate.py: its statistics, and a small in-process comparison end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import call_main
from tests.test_benchmarks_smoke import BENCH, run_script

sys.path.insert(0, str(BENCH))

import evaluate
from evaluate import _save_row, _split_variants, cost_to_target, paired_t, variants_table
from optima import OPTIMA_FILE, load_optima


def evaluate_here(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``evaluate.py ARGV`` in this process (reports and refusals run no sweep):
    its exit status, stdout and stderr."""
    return call_main(evaluate.main, list(argv), capsys)


def test_paired_t():
    mean, t, n = paired_t([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert t == pytest.approx(2.0 / (1.0 / math.sqrt(3)))
    assert paired_t([-0.5, -0.5])[1] == -math.inf
    assert paired_t([0.0, 0.0])[1] == 0.0
    assert math.isnan(paired_t([1.0])[1]) and paired_t([])[2] == 0


def test_two_runs_appending_to_one_file_keep_each_others_rows(tmp_path: Path):
    path = tmp_path / "out.json"
    meta = {"machine": {"cpus": 2}, "date": "d"}

    def row(method: str, seed: int) -> dict:
        return {"pipeline": "paper", "method": method, "seed": seed, "best": float(seed)}

    # Each run holds the document it read at its start; neither has the other's rows.
    first = {**meta, "commands": ["run a"], "rows": []}
    second = {**meta, "commands": ["run b"], "rows": []}
    _save_row(path, first, row("ei", 0), "run a")
    _save_row(path, second, row("eeipu", 0), "run b")
    doc = _save_row(path, first, row("ei", 1), "run a")
    _save_row(path, second, row("eeipu", 0), "run b")  # a repeat is not added twice
    on_disk = json.loads(path.read_text())
    assert on_disk == doc | {"rows": on_disk["rows"]}
    keys = [(r["method"], r["seed"]) for r in on_disk["rows"]]
    assert keys == [("ei", 0), ("eeipu", 0), ("ei", 1)]
    assert on_disk["commands"] == ["run a", "run b"]


def test_ablations_and_partial_methods_are_variants_beside_the_main_table():
    def row(method: str, seed: int, best: float, base: str | None = None) -> dict:
        return {"pipeline": "paper", "method": method, "base_method": base or method,
                "seed": seed, "best": best, "candidates": 10, "options": {}}

    rows = [row("eeipu", s, 1.0 + s) for s in range(4)]
    rows += [row("ei", s, 0.5 * s) for s in range(4)]
    rows += [row("eeipu_gittins", s, 2.0 + s) for s in range(2)]  # fewer seeds
    rows += [row("eeipu-x", s, 1.5 + s, base="eeipu") for s in range(3)]  # an ablation
    main, variants = _split_variants(rows)
    assert {r["method"] for r in main} == {"eeipu", "ei"} and len(main) == 8
    assert variants == ["eeipu_gittins", "eeipu-x"]
    table = variants_table(rows, variants, optimum=10.0)
    assert "eeipu: 1.000, t inf (2)" in table[2]  # a new acquisition: against eeipu
    assert "eeipu: 0.500, t inf (3)" in table[3]  # an ablation: against its base
    assert "ei:" in table[3] and "(3)" in table[3]

    # A variant run under later defaults names the rows it is paired with.
    rows += [row("eeipu-new-defaults", s, 3.0 + s) for s in range(4)]
    rows += [dict(row("eeipu-y", s, 3.25 + s, base="eeipu"), against="eeipu-new-defaults")
             for s in range(2)]
    table = variants_table(rows, ["eeipu-y"], optimum=10.0)
    assert "eeipu-new-defaults: 0.250, t inf (2)" in table[2]


def test_simulated_workers_overlap_trials_and_publish_prefixes_when_they_finish(tmp_path: Path):
    import argparse

    from compare import PIPELINES, make_searcher
    from evaluate import _simulate_workers

    from eeipu_ray.cache import PrefixCache

    spec = PIPELINES["paper"]
    pipeline = spec.build()
    cache = PrefixCache(tmp_path / "cache")
    args = argparse.Namespace(budget=60.0, warmup=4, fast=True, engine_options={}, workers=3)
    searcher, _ = make_searcher("eeipu", pipeline, spec, 0, args, cache)
    log = _simulate_workers(searcher, pipeline, cache, 3, tmp_path / "run")
    finish = {e["trial_id"]: e["finished_at"] for e in log}
    start = {e["trial_id"]: e["finished_at"] - e["total_cost"] for e in log}
    assert [e["finished_at"] for e in log] == sorted(finish.values())  # completion order
    # Three at a time, never more. (Starts are recomputed as finish - cost:
    # equal to the true start up to rounding, hence the tolerance.)
    def running_at(t: float) -> int:
        return sum(start[u] <= t + 1e-9 and t < finish[u] - 1e-9 for u in start)

    assert max(running_at(s0) for s0 in start.values()) == 3
    # A trial loads only prefixes of trials that had finished when it started.
    loads = [(e["trial_id"], src) for e in log for src in e["loaded_from"]]
    assert loads, "no trial reused a prefix"
    for trial, source in loads:
        assert source in finish and finish[source] <= start[trial] + 1e-9, (trial, source)
    assert sum(e["total_cost"] for e in log) >= 60.0


def test_cost_to_target_is_the_first_cost_at_which_the_best_reaches_it():
    curve = [(1.0, math.nan), (2.5, -3.0), (4.0, -1.0), (6.0, 0.5)]
    assert cost_to_target(curve, -1.0) == 4.0
    assert cost_to_target(curve, -5.0) == 2.5
    assert cost_to_target(curve, 1.0) == math.inf


def test_recorded_optima_are_the_layouts_maxima():
    from eeipu_ray.pipelines.synthetic import LAYOUTS, synthetic_objective, synthetic_space
    from eeipu_ray.search import SearchSpace

    optima = load_optima()
    assert set(optima) == set(LAYOUTS)
    recorded = json.loads(OPTIMA_FILE.read_text())["layouts"]
    # Where every term's global minimum lies inside its box, the optimum follows
    # from the test functions' published minima (BoTorch's, rounded to ~5 digits).
    from botorch.test_functions import Branin, Hartmann, SixHumpCamel, StyblinskiTang

    six_hump = SixHumpCamel().optimal_value
    known = {
        "front4": -six_hump,  # Rosenbrock, Levy, Ackley: 0
        "back5": -StyblinskiTang(dim=2).optimal_value / 2,  # the other terms: 0
        "flat4": -(10 * Hartmann(dim=3).optimal_value + Branin().optimal_value + six_hump),
        "costly3": 0.0,
    }
    for name, value in known.items():
        assert optima[name] == pytest.approx(value, abs=1e-3), name
    for name, layout in LAYOUTS.items():
        argmax = recorded[name]["argmax"]
        assert synthetic_objective(argmax, name) == pytest.approx(optima[name], abs=1e-12)
        for stage in layout.stages:
            lo, hi = stage.bounds
            assert all(lo <= v <= hi for v in argmax[stage.name].values())
        # A maximum: no random configuration exceeds it.
        space = SearchSpace.from_tune(synthetic_space(name), stage_order=layout.stage_names)
        sampled = [synthetic_objective(space.from_unit(x), name) for x in space.sample(512, seed=1)]
        assert max(sampled) <= optima[name]


def test_evaluate_runs_methods_and_reports_paired_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "eval"
    common = ("--layouts", "flat4", "--seeds", "0-1", "--budget", "20", "--warmup", "3")
    # The script itself once (a process of its own), then its main() in this one.
    run_script(
        "evaluate.py", *common, "--methods", "eeipu,ei,optuna_tpe", "--fast", "--out", str(out)
    )
    # An ablation appends under its own label, with its option recorded.
    status, stdout, err = evaluate_here(
        capsys,
        *common,
        "--methods",
        "eeipu",
        "--label",
        "eeipu-q1",
        "--option",
        "top_q=1",
        "--fast",
        "--append",
        "--out",
        str(out),
    )
    assert status == 0 and "eeipu-q1" in stdout, err
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = doc["rows"]
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("eeipu", "ei", "optuna_tpe", "eeipu-q1") for s in (0, 1)
    )
    optimum = load_optima()["flat4"]
    for r in rows:
        assert r["pipeline"] == "flat4" and r["budget"] == 20.0
        assert r["spent"] >= 20.0 - 4.1  # a trial costs at most 4.02: it stopped on the budget
        assert r["best"] <= optimum + 1e-9
    assert [r["options"] for r in rows if r["method"] == "eeipu-q1"] == [{"top_q": 1}] * 2
    md = out.with_suffix(".md").read_text()
    assert "## design (seeds 0-9)" in md and "held-out" not in md
    # The ablation is a variant beside the main table, paired with its base method.
    assert '| eeipu-q1 | {"top_q": 1} | 2 |' in md
    assert md.count("| eeipu-q1 |") == 1
    assert "cost to ei's median best (reached)" in md
    assert "Paired per seed, eeipu's best minus each peer's" in md
    paired = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in md.split("Paired per seed, eeipu's", 1)[1].splitlines()
        if line.startswith("| ") and not line.startswith("| peer")
    ]
    assert {c[0]: c[3] for c in paired if len(c) == 5} == {"ei": "2", "optuna_tpe": "2"}
    # Nothing is run twice: a repeat of the first command adds no rows.
    status, _, err = evaluate_here(
        capsys, *common, "--methods", "eeipu,ei", "--fast", "--append", "--out", str(out)
    )
    assert status == 0, err
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == len(rows)


def test_a_bad_option_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    status, _, err = evaluate_here(capsys, "--option", "top_q=-3", "--out", str(tmp_path / "x"))
    assert status != 0 and "top_q=-3" in err
    assert not (tmp_path / "x.json").exists()


def test_against_without_a_label_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    status, _, err = evaluate_here(capsys, "--against", "eeipu-x", "--out", str(tmp_path / "x"))
    assert status != 0 and "--against" in err
    assert not (tmp_path / "x.json").exists()


def test_each_held_out_seed_set_and_their_pool_get_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    def row(method: str, seed: int, best: float) -> dict:
        return {"pipeline": "t5", "method": method, "seed": seed, "budget": 150.0,
                "best": best, "candidates": 5, "curve": [[10.0, best - 0.1], [60.0, best]]}

    def report(seeds: list[int]) -> str:
        rows = [row(m, s, 0.1 * s + (0.5 if m == "eeipu" else 0.0))
                for m in ("eeipu", "ei") for s in seeds]
        source = tmp_path / f"rows{len(seeds)}.json"
        source.write_text(json.dumps({"commands": ["python compare.py"], "rows": rows}))
        out = tmp_path / f"told{len(seeds)}"
        status, _, err = evaluate_here(
            capsys, "--report", "--from-compare", str(source), "--out", str(out)
        )
        assert status == 0, err
        return out.with_suffix(".md").read_text()

    md = report([10, 11, 12, 20, 21])
    assert "## held-out (seeds 10-19)" in md and "## held-out (seeds 20-29)" in md
    pooled = md.split("## held-out, pooled (seeds 10-29)")[1]
    assert "| eeipu | 5 |" in pooled and "| ei | 0.500 |" in pooled  # 5 seeds paired
    md = report([10, 11, 12])  # the pool would repeat the 10-19 table: left out
    assert "## held-out (seeds 10-19)" in md and "pooled" not in md and "20-29" not in md


def test_tune_rows_of_a_real_pipeline_are_reported_without_regret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """``--report --from-compare``: compare.py's rows (t5 has no known optimum)."""

    def row(method: str, seed: int, best: float) -> dict:
        curve = [[10.0, best - 0.1], [60.0, best]]
        return {"pipeline": "t5", "method": method, "seed": seed, "budget": 150.0,
                "best": best, "candidates": 5, "curve": curve}

    rows = [row("eeipu", s, 0.2 + 0.01 * s) for s in range(10, 13)]
    rows += [row("ei", s, 0.1 + 0.02 * s) for s in range(10, 13)]
    rows += [row("ei", 0, 0.5)]  # a design seed: reported in its own table
    source = tmp_path / "compare_real.json"
    source.write_text(json.dumps({"commands": ["python compare.py"], "rows": rows}))
    out = tmp_path / "told"
    status, _, err = evaluate_here(
        capsys, "--report", "--from-compare", str(source), "--out", str(out)
    )
    assert status == 0, err
    md = out.with_suffix(".md").read_text()
    assert "Ray Tune runs" in md and "In-process" not in md
    held_out = md.split("## held-out")[1]
    assert "| method | seeds | best | candidates |" in held_out  # no regret column
    assert "optimum" not in held_out.split("|")[0]
    # eeipu - ei per seed: 0.1 - 0.01 s for s = 10, 11, 12 -> 0.0, -0.01, -0.02
    assert "| ei | -0.010 |" in held_out
    assert not (tmp_path / "told.json").exists()  # a report writes no rows

    # Runs split over several files are merged; a method on fewer seeds is a variant.
    fewer = tmp_path / "compare_fewer.json"
    fewer.write_text(json.dumps({"commands": ["python compare.py --seeds 2"],
                                 "rows": [row("carbo", s, 0.3) for s in (10, 11)]}))
    status, _, err = evaluate_here(
        capsys, "--report", "--from-compare", str(source), str(fewer), "--out", str(out)
    )
    assert status == 0, err
    held_out = out.with_suffix(".md").read_text().split("## held-out")[1]
    assert "| ei | -0.010 |" in held_out
    assert "| carbo | " in held_out.split("Variants")[1]
    # The same run in two files is refused, naming it.
    status, _, err = evaluate_here(
        capsys, "--report", "--from-compare", str(source), str(source), "--out",
        str(tmp_path / "twice"),
    )
    assert status == 2 and "('t5', 'eeipu', 10)" in err


def test_from_compare_without_report_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    argv = ["--from-compare", "x.json", "--out", str(tmp_path / "o")]
    status, _, err = evaluate_here(capsys, *argv)
    assert status == 2 and "--from-compare needs --report" in err
