"""EngineOptions(cost="energy"): joules as the budget and as what the stage-cost
GPs learn, from real pipeline runs metered through a fake NVML binding; and the
trial's meter as the trainable opens it (Ray's GPU ids -> NVML)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import pytest
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from eeipu_ray.energy import NoMeter, NvmlMeter
from eeipu_ray.errors import EnergyMeterError
from eeipu_ray.search import EngineOptions
from eeipu_ray.tune.searcher import EEIPUSearcher
from tests.energy.fakes import FakeNVML

FAST = EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)


def energy_pipeline(nvml: FakeNVML) -> Pipeline:
    """prep spends 2 J or 6 J (by ``scale``); train 1 + 10 * lr J; eval 0.1 J."""

    def prep(_, hp, ctx):
        nvml.spend(0, 2_000 * hp["scale"])
        return {"scale": [hp["scale"]]}

    def train(data, hp, ctx):
        nvml.spend(0, int(1_000 * (1 + 10 * hp["lr"])))
        ctx.report(epoch=1, score=-hp["lr"])
        return {"lr": [hp["lr"]], "scale": data["scale"]}

    def evaluate(model, hp, ctx):
        nvml.spend(0, 100)
        return {"score": -((model["lr"][0] - 0.3) ** 2) - 0.01 * model["scale"][0]}

    return Pipeline(
        "energy-search",
        [
            Stage("prep", prep, {"scale": tune.choice([1, 3])}),
            Stage("train", train, {"lr": tune.uniform(0.0, 1.0)}),
            Stage("eval", evaluate),
        ],
    )


def test_energy_is_the_budget_and_what_the_cost_models_learn(tmp_path):
    nvml = FakeNVML.with_gpus(1)
    pipeline = energy_pipeline(nvml)
    cache = PrefixCache(tmp_path / "cache")
    searcher = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        budget=60.0,
        cache=cache,
        options=replace(FAST, cost="energy", n_warmup=3),
    )
    spent_joules = 0.0
    with NvmlMeter(["0"], nvml=nvml) as meter:
        for i in range(50):
            config = searcher.suggest(f"t{i}")
            if not isinstance(config, dict):
                break
            result = pipeline.run(config, cache, meter=meter).to_result("score")
            spent_joules += result["total_energy_joules"]
            searcher.on_trial_complete(f"t{i}", result=result)
    assert config == "FINISHED"  # the joule budget ran out
    assert searcher.budget_spent == pytest.approx(spent_joules)
    assert 60.0 <= spent_joules < 60.0 + 6.0 + 11.1 + 0.1  # at most one trial past it
    records = searcher.engine.records
    for r in records:
        scale, lr = r.config["prep"]["scale"], r.config["train"]["lr"]
        # The cost models learn joules, the original ones for a cached stage.
        assert r.compute_costs[0] == pytest.approx(2.0 * scale)
        assert r.compute_costs[1] == pytest.approx((1_000 * (1 + 10 * lr) // 1) / 1e3)
    assert any(r.memoized_stages > 0 for r in records)  # the energy of loads was charged too


def test_energy_mode_charges_a_stopped_trial_and_refuses_results_without_energy(tmp_path):
    nvml = FakeNVML.with_gpus(1)
    pipeline = energy_pipeline(nvml)
    searcher = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        budget=100.0,
        options=replace(FAST, cost="energy", n_warmup=2),
    )
    # A trial stopped by a scheduler: Tune hands over its last progress report.
    progress: list[dict[str, Any]] = []
    config = searcher.suggest("stopped")
    with NvmlMeter(["0"], nvml=nvml) as meter:
        pipeline.run(config, None, meter=meter, reporter=progress.append)
    last = {k: v for k, v in progress[-1].items() if k != "stage"}
    assert {"total_cost", "total_energy_joules"} <= set(last)
    searcher.on_trial_complete("stopped", result=last)
    assert searcher.budget_spent == pytest.approx(last["total_energy_joules"])
    assert searcher.budget_spent != pytest.approx(last["total_cost"])

    # A trial from a node without a meter: seconds must not pass for joules.
    config = searcher.suggest("unmetered")
    result = pipeline.run(config, None, meter=None).to_result("score")
    with pytest.raises(EnergyMeterError, match="no measured energy"):
        searcher.on_trial_complete("unmetered", result=result)
    with pytest.raises(ValueError, match="cost="):
        EEIPUSearcher(pipeline, metric="score", mode="max", options=EngineOptions(cost="watts"))


def test_the_trainable_meters_the_gpus_ray_assigned(monkeypatch):
    import ray

    from eeipu_ray.tune import trainable

    nvml = FakeNVML.with_gpus(4)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("EEIPU_ENERGY_METERS", "nvml")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])

    class Context:
        def __init__(self, gpus: float) -> None:
            self.gpus = gpus

        def get_assigned_resources(self) -> dict[str, float]:
            return {"CPU": 1.0, "GPU": self.gpus}

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context(1.0))
    with trainable._trial_meter("energy", "auto", "t1") as meter:
        assert meter.devices == ("gpu:GPU-00000003-fake",) and not meter.shared
        span = meter.begin()
        nvml.spend(3, 1_234)
        nvml.spend(0, 9_999)  # not this trial's GPU
        assert span.read().joules == pytest.approx(1.234)
    # Half a GPU: the counter is the whole GPU's, shared with another trial.
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context(0.5))
    with trainable._trial_meter("time", "auto", "t2") as meter:
        assert meter.shared
    # No GPU and no RAPL: energy mode refuses before any stage runs.
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setenv("EEIPU_ENERGY_METERS", "auto")
    monkeypatch.setattr("eeipu_ray.energy.meters.POWERCAP_ROOT", "/nonexistent")
    with pytest.raises(EnergyMeterError, match="trial t3: energy is the cost"):
        trainable._trial_meter("energy", "auto", "t3")
    assert isinstance(trainable._trial_meter("time", None, "t4"), NoMeter)


def test_the_trainable_takes_one_cost_switch_and_the_former_energy_argument() -> None:
    pipeline = Pipeline("one", [Stage("only", lambda _, hp: {"score": 1.0})])
    with pytest.raises(ValueError, match="cost='watts'"):
        pipeline.as_trainable(cost="watts")
    with pytest.raises(ValueError, match="meter=None measures nothing"):
        pipeline.as_trainable(cost="energy", meter=None)
    with pytest.raises(ValueError, match="meter='nvml'"):
        pipeline.as_trainable(meter="nvml")
    for energy, replacement in (("required", 'cost="energy"'), ("off", "meter=None")):
        with pytest.warns(FutureWarning, match=replacement):
            assert callable(pipeline.as_trainable(energy=energy))
    with pytest.raises(ValueError, match="energy='sometimes'"):
        pipeline.as_trainable(energy="sometimes")
