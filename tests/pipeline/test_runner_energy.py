"""Per-stage energy in the memoized runner, metered through a fake NVML binding
(the double sits at the NVML edge; the meter, runner and cache run for real)."""

from __future__ import annotations

import json
import sys

import pytest
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from eeipu_ray.energy import NvmlMeter
from tests.energy.fakes import FakeNVML

# Millijoules each stage "spends" on GPU 0 while it runs.
SPEND_MJ = {"prep": 4_000, "train": 12_500, "eval": 250}


def gpu_pipeline(nvml: FakeNVML, gpu: int = 0) -> Pipeline:
    def stage(name: str):
        def fn(x, hp, ctx):
            nvml.spend(gpu, SPEND_MJ[name] * hp.get("scale", 1))
            ctx.report(step=name, score=0.5)
            return {"score": 1.0} if name == "eval" else {"v": [1, 2, 3]}

        return fn

    return Pipeline(
        "energy-toy",
        [
            Stage("prep", stage("prep"), {"scale": tune.choice([1, 2])}),
            Stage("train", stage("train"), {"lr": tune.uniform(0, 1)}),
            Stage("eval", stage("eval")),
        ],
    )


CONFIG = {"prep": {"scale": 2}, "train": {"lr": 0.5}, "eval": {}}


def test_executed_and_loaded_stages_report_energy_next_to_time(tmp_path):
    nvml = FakeNVML.with_gpus(2)
    p = gpu_pipeline(nvml)
    cache = PrefixCache(tmp_path / "cache")
    reports: list[dict] = []
    with NvmlMeter(["0"], nvml=nvml) as meter:
        first = p.run(CONFIG, cache, meter=meter, reporter=reports.append)
        result = first.to_result("score")
        assert result["energy_joules/prep"] == pytest.approx(8.0)  # scale 2
        assert result["energy_joules/train"] == pytest.approx(12.5)
        assert result["compute_energy_joules/train"] == pytest.approx(12.5)
        assert result["total_energy_joules"] == pytest.approx(20.75)
        assert result["energy_source/train"] == "nvml" and result["energy_measured/train"] == 1
        assert result["energy_shared"] == 0
        # Time and CPU-seconds are there as before, next to the energy.
        assert result["stage_costs/train"] >= 0 and result["cpu_seconds/train"] >= 0
        # Progress carries the energy spent so far (the running stage's part included).
        assert [r["total_energy_joules"] for r in reports] == pytest.approx([8.0, 20.5, 20.75])

        # Loaded from the cache: the load costs (here) no GPU energy, but the
        # cost models still learn what computing the stages cost.
        second = p.run(CONFIG, cache, meter=meter)
        result = second.to_result("score")
        assert second.memoized_stages == 2
        assert result["energy_joules/prep"] == 0.0 and result["energy_joules/train"] == 0.0
        assert result["energy_measured/train"] == 1  # measured 0 J, not missing
        assert result["compute_energy_joules/prep"] == pytest.approx(8.0)
        assert result["compute_energy_joules/train"] == pytest.approx(12.5)
        assert result["total_energy_joules"] == pytest.approx(0.25)

    manifest = cache.manifest(p.prefix_keys(CONFIG)[1])
    assert list(manifest.meta.compute_energy_joules) == pytest.approx([8.0, 12.5])
    assert list(manifest.meta.energy_sources) == ["nvml", "nvml"]


def test_without_a_meter_energy_is_missing_not_zero(tmp_path):
    nvml = FakeNVML.with_gpus(1)
    p = gpu_pipeline(nvml)
    cache = PrefixCache(tmp_path / "cache")
    result = p.run(CONFIG, cache, meter=None).to_result("score")
    assert not any(k.startswith(("energy_joules/", "compute_energy_joules/")) for k in result)
    assert "total_energy_joules" not in result and "energy_shared" not in result
    assert result["energy_source/train"] == "none" and result["energy_measured/train"] == 0
    assert result["total_cpu_seconds"] >= 0
    # A later trial with a meter loads the entry: its compute energy is unknown,
    # so it is absent (never 0), while the load itself is measured.
    with NvmlMeter(["0"], nvml=nvml) as meter:
        loaded = p.run(CONFIG, cache, meter=meter).to_result("score")
    assert "compute_energy_joules/train" not in loaded
    assert loaded["energy_joules/train"] == 0.0


def test_manifests_written_before_energy_still_load(tmp_path):
    nvml = FakeNVML.with_gpus(1)
    p = gpu_pipeline(nvml)
    root = tmp_path / "cache"
    cache = PrefixCache(root)
    with NvmlMeter(["0"], nvml=nvml) as meter:
        p.run(CONFIG, cache, meter=meter)
    # Strip the energy fields from every manifest, as an older writer left them.
    manifests = [m for m in root.rglob("*") if m.is_file() and m.read_bytes()[:1] == b"{"]
    stripped = 0
    for path in manifests:
        doc = json.loads(path.read_bytes())
        if isinstance(doc, dict) and "meta" in doc and "compute_energy_joules" in doc["meta"]:
            del doc["meta"]["compute_energy_joules"], doc["meta"]["energy_sources"]
            path.write_text(json.dumps(doc, sort_keys=True))
            stripped += 1
    assert stripped == 2
    with NvmlMeter(["0"], nvml=nvml) as meter:
        run = p.run(CONFIG, PrefixCache(root), meter=meter)
    assert run.memoized_stages == 2  # still a hit
    assert run.stages[1].compute_energy_joules is None


def test_auto_meter_meters_the_visible_gpus(monkeypatch):
    nvml = FakeNVML.with_gpus(3)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # the NVML binding the meter imports
    monkeypatch.setenv("EEIPU_ENERGY_METERS", "nvml")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    p = gpu_pipeline(nvml, gpu=2)
    result = p.run(CONFIG, None, device="cuda:0").to_result("score")
    assert result["total_energy_joules"] == pytest.approx(20.75)
    assert nvml.inits == nvml.shutdowns == 1  # the runner opened and closed it
    # A CPU run asks no GPU meter: energy missing.
    monkeypatch.setenv("EEIPU_ENERGY_METERS", "auto")
    cpu = p.run(CONFIG, None, device="cpu").to_result("score")
    assert cpu["energy_source/train"] in ("none", "rapl")
    assert cpu.get("energy_source/train") != "nvml"
