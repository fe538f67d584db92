"""The memoized runner, driven against a real local PrefixCache."""

from __future__ import annotations

import collections
import json
import shutil
import time

import numpy as np
import pytest
from ray import tune

from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import CodecError, ConfigError, StageExecutionError
from eeipu_ray.pipeline import Pipeline, PipelineRun, Stage, StageContext, run_pipeline

CONFIG = {"prep": {"n": 5}, "feat": {"scale": 2.0}, "train": {"lr": 0.5}}


@pytest.fixture
def cache(tmp_path) -> PrefixCache:
    return PrefixCache(str(tmp_path / "cache"))


def toy(calls: collections.Counter, *, prep_sleep: float = 0.0, **stage_kwargs) -> Pipeline:
    """prep -> feat -> train; ``calls`` counts which stage functions really ran."""

    def prep(inputs, params, ctx):
        calls["prep"] += 1
        assert inputs is None
        if prep_sleep:
            time.sleep(prep_sleep)
        return np.arange(params["n"], dtype=np.float64)

    def feat(inputs, params, ctx):
        calls["feat"] += 1
        return {"x": inputs * params["scale"], "note": "features"}

    def train(inputs, params):  # two-argument form
        calls["train"] += 1
        return {"score": float(inputs["x"].sum()) * params["lr"], "n_rows": len(inputs["x"])}

    return Pipeline(
        "toy",
        [
            Stage("prep", prep, {"n": tune.randint(1, 100)}, **stage_kwargs.get("prep", {})),
            Stage("feat", feat, {"scale": tune.uniform(0, 10)}, **stage_kwargs.get("feat", {})),
            Stage("train", train, {"lr": tune.loguniform(1e-3, 1)}),
        ],
    )


def statuses(run: PipelineRun) -> list[str]:
    return [s.status for s in run.stages]


# ------------------------------------------------------------ memoization
def test_first_run_executes_everything_and_stores_all_but_last(cache):
    calls = collections.Counter()
    p = toy(calls)
    run = p.run(CONFIG, cache)
    assert calls == {"prep": 1, "feat": 1, "train": 1}
    assert run.memoized_stages == 0
    assert statuses(run) == ["executed"] * 3
    assert run.output == {"score": 10.0, "n_rows": 5}
    keys = p.prefix_keys(CONFIG)
    assert [s.prefix_key for s in run.stages] == keys
    assert cache.contains(keys[0]) and cache.contains(keys[1])
    assert not cache.contains(keys[2])  # the last stage output is never stored
    assert len([e for e in cache.entries() if e.complete]) == 2
    assert [s.stored for s in run.stages] == [True, True, False]
    assert run.stages[0].bytes > 0 and run.stages[1].bytes > 0 and run.stages[2].bytes == 0


def test_second_run_loads_deepest_prefix_without_calling_its_stages(cache):
    calls = collections.Counter()
    p = toy(calls)
    first = p.run(CONFIG, cache)
    second = p.run(CONFIG, cache)
    assert calls == {"prep": 1, "feat": 1, "train": 2}
    assert second.memoized_stages == 2
    assert statuses(second) == ["loaded", "loaded", "executed"]
    assert [s.cache_hit for s in second.stages] == [True, True, False]
    assert second.output == first.output
    assert [s.prefix_key for s in second.stages] == [s.prefix_key for s in first.stages]


def test_changing_stage2_params_reuses_stage1(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache)
    run = p.run({**CONFIG, "feat": {"scale": 3.0}}, cache)
    assert calls == {"prep": 1, "feat": 2, "train": 2}
    assert run.memoized_stages == 1
    assert statuses(run) == ["loaded", "executed", "executed"]
    assert run.output["score"] == pytest.approx(sum(range(5)) * 3.0 * 0.5)


def test_changing_only_last_stage_reuses_both(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache)
    run = p.run({**CONFIG, "train": {"lr": 0.25}}, cache)
    assert run.memoized_stages == 2
    assert calls == {"prep": 1, "feat": 1, "train": 2}
    assert run.output["score"] == 5.0


def test_changing_stage1_recomputes_everything(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache)
    run = p.run({**CONFIG, "prep": {"n": 6}}, cache)
    assert run.memoized_stages == 0
    assert calls == {"prep": 2, "feat": 2, "train": 2}


def test_flat_config_hits_entries_of_nested_config(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache)
    run = p.run({"prep/n": 5, "feat/scale": 2.0, "train/lr": 0.5}, cache)
    assert run.memoized_stages == 2


def test_numpy_scalar_params_hit_the_cache(cache):
    calls = collections.Counter()
    p = toy(calls)
    cfg = {"prep": {"n": np.int64(5)}, "feat": {"scale": np.float32(2.0)}, "train": {"lr": 0.5}}
    p.run(cfg, cache)
    run = p.run(cfg, cache)
    assert run.memoized_stages == 2
    assert calls["prep"] == 1
    # the Python-scalar config is the same prefix
    assert p.run(CONFIG, cache).memoized_stages == 2


def test_version_bump_invalidates_that_stage_and_later(cache):
    calls = collections.Counter()
    toy(calls).run(CONFIG, cache)
    bumped = toy(calls, feat={"version": "2"})
    run = bumped.run(CONFIG, cache)
    assert run.memoized_stages == 1
    assert calls == {"prep": 1, "feat": 2, "train": 2}


def test_other_pipeline_name_shares_nothing(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache)
    other = Pipeline("other", list(p.stages))
    assert other.run(CONFIG, cache).memoized_stages == 0


def test_config_error_before_any_stage_runs(cache):
    calls = collections.Counter()
    with pytest.raises(ConfigError, match=r"feat/scale"):
        toy(calls).run({"prep": {"n": 1}, "train": {"lr": 0.1}}, cache)
    assert not calls


def test_single_stage_pipeline_stores_nothing(cache):
    p = Pipeline("one", [Stage("only", lambda _, hp: {"score": hp["x"]}, {"x": 1.0})])
    run = p.run({}, cache)
    assert run.output == {"score": 1.0} and run.memoized_stages == 0
    assert cache.entries() == []


# --------------------------------------------------------------- records
def test_loaded_record_keeps_original_compute_time(cache):
    # Kind (b): only what holds on any machine, loaded or idle: a sleep is a lower
    # bound on a measured time; how long a load takes is not bounded above, so the
    # charges are checked by what they are made of, not raced against each other.
    calls = collections.Counter()
    p = toy(calls, prep_sleep=0.2)
    first = p.run(CONFIG, cache, trial_id="trial-1")
    prep1, feat1, train1 = first.stages
    assert prep1.status == "executed" and prep1.compute_cost >= 0.2
    # an executed stage pays its compute time and its store time
    assert prep1.cost == pytest.approx(prep1.compute_cost + prep1.store_seconds)
    assert prep1.store_seconds > 0 and prep1.load_seconds == 0.0
    assert train1.store_seconds == 0.0 and train1.cost == train1.compute_cost

    second = p.run(CONFIG, cache, trial_id="trial-2")
    prep2, feat2, train2 = second.stages
    assert prep2.status == feat2.status == "loaded"
    assert prep2.compute_cost == prep1.compute_cost  # as first recorded
    assert feat2.compute_cost == feat1.compute_cost
    assert prep2.cost == 0.0 and prep2.bytes == 0 and prep2.load_seconds == 0.0
    assert feat2.cost > 0.0
    assert feat2.load_seconds == feat2.cost
    assert feat2.bytes == feat1.bytes > 0
    assert feat2.producer.get("trial_id") == "trial-1"
    assert prep2.producer == {}
    assert train2.status == "executed"
    # The second trial pays the load and the stage it ran, nothing of the loaded
    # compute (the first paid prep's 0.2 s sleep and more).
    assert second.total_cost == pytest.approx(feat2.load_seconds + train2.cost)
    assert first.total_cost >= prep1.compute_cost >= 0.2


def test_declared_costs_replace_the_clock(cache):
    def prep(_, hp, ctx):
        return [hp["n"]] * 3

    def feat(x, hp, ctx):
        ctx.charge(7.5)  # overrides Stage.cost
        return [*x, hp["m"]]

    p = Pipeline(
        "declared",
        [
            Stage("prep", prep, {"n": 2}, cost=lambda hp: 10.0 * hp["n"], load_cost=0.5),
            Stage("feat", feat, {"m": 1}, cost=lambda hp: 999.0, load_cost=1.25),
            Stage("train", lambda x, hp: {"score": float(sum(x))}),
        ],
    )
    first = p.run({}, cache)
    assert [s.compute_cost for s in first.stages[:2]] == [20.0, 7.5]
    assert [s.cost for s in first.stages[:2]] == [20.0, 7.5]  # no store time added
    assert first.stages[0].stored and first.stages[1].stored

    second = p.run({}, cache)
    assert second.memoized_stages == 2
    assert [s.compute_cost for s in second.stages[:2]] == [20.0, 7.5]
    # a declared load_cost is charged for every loaded stage
    assert [s.cost for s in second.stages[:2]] == [0.5, 1.25]
    result = second.to_result("score")
    assert result["stage_costs/prep"] == 0.5 and result["compute_costs/prep"] == 20.0
    assert result["total_cost"] == pytest.approx(1.75 + second.stages[2].cost)


def test_bad_declared_costs_name_the_stage():
    def boom(hp):
        raise KeyError("missing")

    p = Pipeline("c", [Stage("prep", lambda _, hp: 1, cost=boom), Stage("t", lambda x, hp: x)])
    with pytest.raises(StageExecutionError, match=r"'prep'.*cost") as info:
        p.run({})
    assert isinstance(info.value.__cause__, KeyError)
    p = Pipeline("c", [Stage("prep", lambda _, hp: 1, cost=lambda hp: -1.0)])
    with pytest.raises(StageExecutionError, match=r"'prep'.*-1.0"):
        p.run({})
    p = Pipeline("c", [Stage("prep", lambda _, hp: 1, cost=lambda hp: float("inf"))])
    with pytest.raises(StageExecutionError, match=r"'prep'"):
        p.run({})


def test_stage_charging_a_bad_cost_fails_that_stage():
    def charge_nan(_, hp, ctx):
        ctx.charge(float("nan"))

    with pytest.raises(StageExecutionError, match=r"'bad'"):
        Pipeline("c", [Stage("bad", charge_nan)]).run({})


# ---------------------------------------------------------------- errors
def test_stage_exception_names_stage_and_keeps_cause(cache):
    def feat(x, hp):
        raise ZeroDivisionError("kaboom")

    calls = collections.Counter()
    base = toy(calls)
    p = Pipeline("toy", [base.stages[0], Stage("feat", feat, {"scale": 1.0}), base.stages[2]])
    with pytest.raises(StageExecutionError) as info:
        p.run({"prep": {"n": 3}, "train": {"lr": 0.1}}, cache)
    msg = str(info.value)
    assert "'feat'" in msg and "#2" in msg and "kaboom" in msg and "'toy'" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    keys = p.prefix_keys({"prep": {"n": 3}, "train": {"lr": 0.1}})
    assert cache.contains(keys[0]) and not cache.contains(keys[1])
    assert calls["train"] == 0


def test_a_failed_stage_says_what_the_trial_spent(cache):
    def feat(x, hp):
        time.sleep(0.05)
        raise ZeroDivisionError("kaboom")

    calls = collections.Counter()
    base = toy(calls, prep_sleep=0.05)
    p = Pipeline("toy", [base.stages[0], Stage("feat", feat, {"scale": 1.0}), base.stages[2]])
    config = {"prep": {"n": 3}, "train": {"lr": 0.1}}
    with pytest.raises(StageExecutionError) as info:
        p.run(config, cache)
    spent = info.value.spent
    # The stage that ran, and the one that failed after 50 ms; nothing after it.
    assert spent["stage_costs/prep"] > 0 and spent["stage_costs/feat"] >= 0.05
    assert "stage_costs/train" not in spent and "score" not in spent
    assert 0.05 <= spent["compute_costs/prep"] <= spent["stage_costs/prep"]  # + store time
    assert "compute_costs/feat" not in spent  # it never finished: its cost is unknown
    assert spent["total_cost"] == pytest.approx(
        spent["stage_costs/prep"] + spent["stage_costs/feat"]
    )
    # Again, with stage 1 cached: the load is what it spent there. Kind (b): the
    # charge is the load, not prep's compute (no race between the two clocks).
    with pytest.raises(StageExecutionError) as again:
        p.run(config, cache)
    assert again.value.spent["memoized_stages"] == 1
    assert again.value.spent["cache_hit/prep"] == 1
    assert again.value.spent["stage_costs/prep"] == again.value.spent["load_seconds/prep"] > 0
    assert again.value.spent["compute_costs/prep"] == spent["compute_costs/prep"]


class Opaque:
    def __init__(self, v):
        self.v = v


@pytest.mark.parametrize("bad", [{1, 2, 3}, Opaque(1)], ids=["set", "custom-class"])
def test_unstorable_output_raises_codec_error_naming_stage(cache, bad):
    p = Pipeline("u", [Stage("make", lambda _, hp: bad), Stage("use", lambda x, hp: 1.0)])
    with pytest.raises(CodecError, match=r"stage 'make'"):
        p.run({}, cache)
    # without a cache nothing is encoded, so the run succeeds
    assert p.run({}, None).output == 1.0


def test_unstorable_last_output_is_fine(cache):
    p = Pipeline("u", [Stage("a", lambda _, hp: [1]), Stage("b", lambda x, hp: {1, 2})])
    assert p.run({}, cache).output == {1, 2}


# ------------------------------------------------------------- to_result
def test_to_result_schema(cache):
    calls = collections.Counter()
    p = toy(calls)
    p.run(CONFIG, cache, meter=None)
    run = p.run(CONFIG, cache, meter=None)  # no energy meter: energy keys stay out
    result = run.to_result("score")
    per_stage = {
        f"{field}/{s}"
        for field in (
            "stage_costs",
            "compute_costs",
            "cache_hit",
            "cache_bytes",
            "load_seconds",
            "prefix_key",
            "cpu_seconds",
            "energy_source",
            "energy_measured",
        )
        for s in ("prep", "feat", "train")
    }
    assert set(result) == per_stage | {
        "score",
        "n_rows",
        "memoized_stages",
        "total_cost",
        "total_cpu_seconds",
    }
    assert [result[f"energy_source/{s}"] for s in ("prep", "feat", "train")] == ["none"] * 3
    assert result["score"] == 10.0 and result["n_rows"] == 5
    assert result["memoized_stages"] == 2
    assert [result[f"cache_hit/{s}"] for s in ("prep", "feat", "train")] == [1, 1, 0]
    assert result["prefix_key/feat"] == p.prefix_keys(CONFIG)[1]
    assert result["cache_bytes/feat"] == run.stages[1].bytes > 0
    assert result["load_seconds/feat"] > 0 and result["load_seconds/prep"] == 0.0
    assert result["total_cost"] == pytest.approx(
        sum(result[f"stage_costs/{s}"] for s in ("prep", "feat", "train"))
    )
    assert result["compute_costs/prep"] == run.stages[0].compute_cost


def test_to_result_metric_handling():
    def run_of(output) -> PipelineRun:
        return Pipeline("m", [Stage("last", lambda _, hp: output)]).run({})

    with pytest.raises(StageExecutionError, match=r"'last'.*'score'"):
        run_of({"loss": 1.0}).to_result("score")
    with pytest.raises(StageExecutionError, match=r"'last'.*'score'"):
        run_of("not a number").to_result("score")
    with pytest.raises(StageExecutionError, match=r"'score'"):
        run_of({"score": True}).to_result("score")  # a flag, not a metric
    assert run_of(3).to_result("acc")["acc"] == 3.0
    assert run_of(0.25).to_result(None)["score"] == 0.25
    assert run_of(np.float32(0.5)).to_result("acc")["acc"] == 0.5
    numpy_metric = run_of({"score": np.float32(0.75), "step": np.int64(3)}).to_result("score")
    assert numpy_metric["score"] == 0.75 and numpy_metric["step"] == 3
    assert type(numpy_metric["score"]) is float and type(numpy_metric["step"]) is int
    mixed = run_of({"score": 1, "a/b": 2.0, "name": "x", 5: 1.0}).to_result("score")
    assert "a/b" not in mixed and "name" not in mixed and 5 not in mixed
    assert "score" not in run_of("text").to_result(None)


def test_as_dict(cache):
    run = toy(collections.Counter()).run(CONFIG, cache)
    d = run.as_dict()
    assert d["memoized_stages"] == 0
    assert [s["name"] for s in d["stages"]] == ["prep", "feat", "train"]
    assert d["stages"][0]["status"] == "executed"


# ------------------------------------------------------------- no cache
def test_run_without_cache_stores_nothing(tmp_path):
    calls = collections.Counter()
    p = toy(calls)
    first = run_pipeline(p, CONFIG, None)
    second = run_pipeline(p, CONFIG, None)
    assert calls == {"prep": 2, "feat": 2, "train": 2}
    assert first.memoized_stages == second.memoized_stages == 0
    assert not any(s.stored for s in second.stages)
    assert all(s.bytes == 0 and s.store_seconds == 0.0 for s in second.stages)
    fresh = PrefixCache(str(tmp_path / "fresh"))
    assert p.run(CONFIG, fresh).memoized_stages == 0


# -------------------------------------------------------------- context
def test_stage_context(tmp_path):
    seen: dict[str, StageContext] = {}
    reports: list[dict] = []

    def a(_, hp, ctx):
        assert ctx.trial_dir.is_dir()
        (ctx.trial_dir / "scratch.txt").write_text("a")
        seen["a"] = ctx
        ctx.report(step=1)
        return 1

    def b(x, hp, ctx):
        assert ctx.trial_dir.is_dir()
        seen["b"] = ctx
        return x + hp["y"]

    p = Pipeline("ctx", [Stage("a", a, {"x": tune.uniform(0, 1)}), Stage("b", b, {"y": 2})])
    run = run_pipeline(
        p,
        {"a/x": 0.5},
        None,
        trial_dir=tmp_path / "trial",
        device="cuda:3",
        reporter=reports.append,
        meter=None,
    )
    assert run.output == 3
    assert seen["a"].stage == "a" and seen["a"].index == 1
    assert seen["b"].stage == "b" and seen["b"].index == 2
    assert seen["a"].device == seen["b"].device == "cuda:3"
    assert seen["a"].params == {"a": {"x": 0.5}}
    assert seen["b"].params == {"a": {"x": 0.5}, "b": {"y": 2}}
    assert seen["a"].trial_dir == tmp_path / "trial" / "a"
    assert (tmp_path / "trial" / "a" / "scratch.txt").read_text() == "a"
    # Progress carries the trial's running totals; no meter, so no joules.
    assert [{k: r[k] for k in ("stage", "step")} for r in reports] == [{"stage": "a", "step": 1}]
    assert set(reports[0]) == {"stage", "step", "total_cost", "total_cpu_seconds"}
    assert 0.0 <= reports[0]["total_cost"] <= run.total_cost


def test_default_trial_dir_is_created_and_removed_after_the_run(cache):
    """Without a trial_dir the runner's own scratch directory does not outlive the run,
    whether the run succeeds, hits the cache or fails; a given trial_dir is kept."""
    dirs = []

    def a(_, hp, ctx):
        dirs.append(ctx.trial_dir)
        (ctx.trial_dir / "scratch.bin").write_bytes(b"x" * hp["n"])
        return np.arange(float(hp["n"]))

    def b(x, hp, ctx):
        dirs.append(ctx.trial_dir)
        if hp["fail"]:
            raise RuntimeError("boom")
        return {"score": float(x.sum()), "dir_existed": ctx.trial_dir.is_dir()}

    p = Pipeline("d", [Stage("a", a, {"n": 3}), Stage("b", b, {"fail": False})])
    first = p.run({}, cache)
    again = p.run({}, cache)  # loads stage a from the cache
    assert first.output == again.output == {"score": 3.0, "dir_existed": True}
    assert again.memoized_stages == 1
    with pytest.raises(StageExecutionError):
        p.run({"b": {"fail": True}}, cache)
    roots = {d.parent for d in dirs}
    assert len(roots) == 3
    assert not any(r.exists() for r in roots)


def test_given_trial_dir_is_kept(tmp_path):
    def a(_, hp, ctx):
        (ctx.trial_dir / "model.txt").write_text("weights")
        return 1.0

    Pipeline("k", [Stage("a", a)]).run({}, trial_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "a" / "model.txt").read_text() == "weights"


def test_path_output_is_restored_and_scratch_cleanup_is_safe(tmp_path, cache):
    """A stage named "restored" wiping its scratch dir must not delete its restored input."""

    def checkpoint(_, hp, ctx):
        out = ctx.trial_dir / "ckpt"
        (out / "sub").mkdir(parents=True)
        (out / "weights.bin").write_bytes(bytes(range(256)) * hp["k"])
        (out / "sub" / "cfg.json").write_text(json.dumps({"k": hp["k"]}))
        return out

    def restored(path, hp, ctx):
        shutil.rmtree(ctx.trial_dir)
        ctx.trial_dir.mkdir()
        return {
            "score": float(len((path / "weights.bin").read_bytes())),
            "cfg": (path / "sub" / "cfg.json").read_text(),
        }

    p = Pipeline("ck", [Stage("ckpt", checkpoint, {"k": 3}), Stage("restored", restored)])
    first = run_pipeline(p, {}, cache, trial_dir=tmp_path / "t1")
    second = run_pipeline(p, {}, cache, trial_dir=tmp_path / "t2")
    assert second.memoized_stages == 1
    assert first.output == second.output == {"score": 768.0, "cfg": '{"k": 3}'}


def test_loaded_input_can_be_modified_in_place_like_a_computed_one(cache):
    def center(x, hp):
        x -= x.mean()  # in place, as stage code often does
        return {"score": float(np.abs(x).sum())}

    p = Pipeline("inplace", [Stage("a", lambda _, hp: np.arange(4.0)), Stage("b", center)])
    first = p.run({}, cache)
    second = p.run({}, cache)
    assert second.memoized_stages == 1
    assert first.output == second.output == {"score": 4.0}
