"""The real GPU paths: CUDA stages, NVML energy, a Ray Tune trial on a GPU.

Everywhere else the NVML binding is a test double (tests/energy/fakes.py);
here nothing is: these tests run where torch sees a CUDA device and NVML
starts, and are skipped elsewhere (CI has no GPU). ``scripts/gpu/check.sh``
runs them on a GPU machine together with a recording of CNN learning curves
in joules.

What each asserts can fail on a real machine: a meter that counts nothing, the
wrong GPU, an estimate passed off as a measurement, a trial that runs on the
CPU although Ray gave it a GPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")


def _nvml_works() -> str | None:
    """None when NVML starts and sees a GPU, else why not."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"NVML does not start: {exc}"
    try:
        return None if pynvml.nvmlDeviceGetCount() > 0 else "NVML sees no GPU"
    finally:
        pynvml.nvmlShutdown()


_WHY_NOT = None if torch.cuda.is_available() else "torch sees no CUDA device"
_WHY_NOT = _WHY_NOT or _nvml_works()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"needs a GPU: {_WHY_NOT}")

# The most a single GPU draws (H200/H100 SXM: 700 W), with room: a reading
# above this per second of work is not a measurement of one GPU.
MAX_WATTS = 1500.0


def _busy(seconds: float, device: str = "cuda:0") -> float:
    """Keep the GPU busy with matrix products for about ``seconds``; returns wall time."""
    a = torch.randn(4096, 4096, device=device)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(20):
            a = torch.tanh(a @ a / 64.0)
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def test_nvml_meter_measures_the_energy_of_gpu_work():
    from eeipu_ray.energy import NvmlMeter

    with NvmlMeter(["0"]) as meter:
        span = meter.begin()
        wall = _busy(2.0)
        reading = span.read()
        assert reading.source == "nvml" and reading.measured
        assert reading.joules is not None
        # A busy GPU draws tens of watts at the very least; the counter is in mJ.
        assert 10.0 <= reading.joules <= MAX_WATTS * wall, reading
        # A shorter stretch of the same work costs less energy.
        span = meter.begin()
        _busy(0.5)
        short = span.read()
    assert short.joules is not None and short.joules < reading.joules


def test_runner_reports_measured_joules_per_stage_on_cuda(tmp_path):
    from eeipu_ray import Pipeline, Stage
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline.runner import run_pipeline

    def prep(_: Any, hp: dict, ctx: Any) -> dict:
        return {"x": torch.randn(hp["n"], hp["n"], generator=torch.Generator().manual_seed(0))}

    def work(data: dict, hp: dict, ctx: Any) -> dict:
        assert ctx.device.startswith("cuda")
        x = data["x"].to(ctx.device)
        started = time.perf_counter()
        while time.perf_counter() - started < hp["seconds"]:
            x = torch.tanh(x @ x / 64.0)
            torch.cuda.synchronize(ctx.device)
        return {"score": float(x.abs().mean().cpu()), "device": str(x.device)}

    pipeline = Pipeline(
        "gpu-energy", [Stage("prep", prep, {"n": 2048}), Stage("work", work, {"seconds": 1.5})]
    )
    cache = PrefixCache(str(tmp_path / "cache"))
    config = {"prep": {"n": 2048}, "work": {"seconds": 1.5}}
    run = run_pipeline(pipeline, config, cache, device="cuda:0")
    work_stage = run.stages[1]
    assert run.output["device"].startswith("cuda")
    assert "nvml" in work_stage.energy_source and work_stage.energy_measured
    assert work_stage.energy_joules is not None and work_stage.energy_joules >= 10.0
    assert run.total_energy_joules is not None and run.total_energy_joules >= 10.0
    result = run.to_result("score")
    assert result["energy_measured/work"] == 1 and result["total_energy_joules"] > 0
    # Memoized: the second run loads prep, spends (nearly) nothing on it, and
    # still measures the work stage.
    again = run_pipeline(pipeline, config, cache, device="cuda:0")
    assert again.memoized_stages == 1
    assert again.stages[1].energy_joules is not None and again.stages[1].energy_joules >= 10.0


def test_fits_device_memory_reads_the_real_gpu():
    from eeipu_ray.tune import fits_device_memory

    total = torch.cuda.get_device_properties(0).total_memory
    fits = fits_device_memory(lambda c: c["bytes"], "auto", headroom=0.5)
    assert fits({"bytes": total * 0.4}) and not fits({"bytes": total * 0.6})


def test_tune_trial_on_a_gpu_is_metered_on_its_gpu(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import tune

    from eeipu_ray import Pipeline, Stage
    from eeipu_ray.cache import PrefixCache

    def train(_: Any, hp: dict, ctx: Any) -> dict:
        x = torch.randn(2048, 2048, device=ctx.device)
        started = time.perf_counter()
        while time.perf_counter() - started < hp["seconds"]:
            x = torch.tanh(x @ x / 64.0)
            torch.cuda.synchronize(ctx.device)
        return {
            "score": float(x.abs().mean().cpu()),
            "on_cuda": float(x.is_cuda),
            "visible": float(len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(","))),
        }

    pipeline = Pipeline("gpu-trial", [Stage("train", train, {"seconds": tune.choice([1.0])})])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        trainable = tune.with_resources(
            pipeline.as_trainable(cache=PrefixCache(str(tmp_path / "cache")), metric="score"),
            {"cpu": 1, "gpu": 1},
        )
        results = tune.Tuner(
            trainable,
            param_space=pipeline.search_space,
            tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=2),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert not results.errors
    for r in results:
        m = r.metrics
        assert m["on_cuda"] == 1.0 and m["visible"] == 1.0  # Ray gave it exactly one GPU
        assert m["energy_source/train"].startswith("nvml") and m["energy_measured/train"] == 1
        assert 5.0 <= m["total_energy_joules"] <= MAX_WATTS * 60
