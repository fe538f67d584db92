"""A stage that trains data-parallel on Ray Train workers, on CPU with Gloo.

The model is a linear regression on fixed synthetic data, trained by
full-batch gradient descent: each worker takes every ``world``-th row (equal
shards), DDP averages the shard gradients, which is the full-batch gradient,
so one worker and two give the same weights up to float64 rounding.

Starting a worker group takes tens of seconds on a busy 2-core machine, so
the two-worker run of the pipeline is made once per module (``two_workers``)
and shared by the tests that look at it from different sides.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import tune

from eeipu_ray import Pipeline, PipelineDefinitionError, PipelineRun, Stage
from eeipu_ray import result as R
from eeipu_ray.cache import PrefixCache
from eeipu_ray.train import max_concurrent_trials, train_stage
from tests.conftest import local_ray

pytestmark = pytest.mark.slow

TRUE_WEIGHT = (1.5, -2.0, 0.5)
TRUE_BIAS = 0.25
ROWS = 64  # divisible by the worker counts: equal shards
HYPERPARAMETERS = {"lr": 0.1, "epochs": 40}
REPORT_EVERY = 20  # epochs between ray.train.report calls (each is a barrier)


# ------------------------------------------------------------------ stages
def make_data(_: Any, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(params["seed"])
    x = torch.randn(ROWS, len(TRUE_WEIGHT), generator=generator, dtype=torch.float64)
    y = x @ torch.tensor(TRUE_WEIGHT, dtype=torch.float64) + TRUE_BIAS
    y = y + 0.01 * torch.randn(ROWS, generator=generator, dtype=torch.float64)
    return {"x": x, "y": y}


def regression_loop(
    inputs: dict[str, torch.Tensor],
    params: dict[str, Any],
    *,
    calls_dir: str,
    as_checkpoint: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Runs on every worker: full-batch gradient descent on this worker's shard.

    Rank 0 returns the weights; with ``as_checkpoint`` it saves them in the
    last report's checkpoint (``model.pt``) instead, and every rank returns None.
    """
    import tempfile
    import time

    import ray.train
    import ray.train.torch

    started = time.perf_counter()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    Path(calls_dir, f"rank{rank}-of{world}-{uuid.uuid4().hex[:8]}").touch()
    torch.manual_seed(0)  # the same initial weights on every worker (DDP broadcasts rank 0's)
    model = ray.train.torch.prepare_model(torch.nn.Linear(len(TRUE_WEIGHT), 1).double())
    optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"])
    module = getattr(model, "module", model)  # DDP wraps it with two workers
    x, y = inputs["x"][rank::world], inputs["y"][rank::world]
    for epoch in range(1, params["epochs"] + 1):
        optimizer.zero_grad()
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        if epoch % REPORT_EVERY == 0:
            metrics = {
                "epoch": epoch,
                "loss": loss.item(),
                "rank": rank,
                "loop_seconds": time.perf_counter() - started,
            }
            with tempfile.TemporaryDirectory() as directory:
                checkpoint = None
                if as_checkpoint and rank == 0 and epoch == params["epochs"]:
                    torch.save(module.state_dict(), Path(directory, "model.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=checkpoint)  # uploaded before it returns
    if as_checkpoint:
        return None
    return {key: value.detach() for key, value in module.state_dict().items()}


def score(state: dict[str, torch.Tensor] | Path, params: dict[str, Any]) -> dict[str, Any]:
    if isinstance(state, Path):  # a checkpoint directory
        state = torch.load(state / "model.pt")
    error = (state["weight"].squeeze(0) - torch.tensor(TRUE_WEIGHT, dtype=torch.float64)).norm()
    return {"score": -params["scale"] * float(error), **state}


def regression_pipeline(
    name: str, calls_dir: Path, *, num_workers: int, as_checkpoint: bool = False
) -> Pipeline:
    loop = partial(regression_loop, calls_dir=str(calls_dir), as_checkpoint=as_checkpoint)
    return Pipeline(
        name,
        [
            Stage("data", make_data, {"seed": 7}),
            train_stage("train", loop, dict(HYPERPARAMETERS), num_workers=num_workers),
            Stage("score", score, {"scale": tune.uniform(0.5, 2.0)}),
        ],
    )


def calls(calls_dir: Path) -> list[str]:
    """One name per started training loop: ``rank<r>-of<world>-<id>``."""
    return sorted(p.name for p in calls_dir.iterdir())


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_4cpu() -> Iterator[Any]:
    """A local Ray with 4 CPUs: a trial's own CPU plus a worker group of 2, with room."""
    with local_ray(4) as ray:
        yield ray


@dataclass
class TwoWorkerRun:
    pipeline: Pipeline
    cache: PrefixCache
    calls_dir: Path
    run: PipelineRun
    progress: list[dict[str, Any]]


@pytest.fixture(scope="module")
def two_workers(ray_4cpu: Any, tmp_path_factory: pytest.TempPathFactory) -> TwoWorkerRun:
    """The pipeline run once with 2 workers, against a fresh local cache."""
    root = tmp_path_factory.mktemp("two-workers")
    calls_dir = root / "calls"
    calls_dir.mkdir()
    pipeline = regression_pipeline("ray-train-regression", calls_dir, num_workers=2)
    cache = PrefixCache(str(root / "cache"))
    progress: list[dict[str, Any]] = []
    run = pipeline.run(
        {"score": {"scale": 1.0}},
        cache,
        trial_dir=root / "trial-1",
        reporter=progress.append,
        meter=None,
    )
    return TwoWorkerRun(pipeline, cache, calls_dir, run, progress)


# ------------------------------------------------------------------- tests
def test_two_workers_train_the_weights_of_one(two_workers: TwoWorkerRun, tmp_path: Path) -> None:
    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()
    one = regression_pipeline("ray-train-regression", calls_dir, num_workers=1)
    single = one.run({"score": {"scale": 1.0}}, None, trial_dir=tmp_path / "trial", meter=None)

    assert calls(calls_dir)[0].startswith("rank0-of1-")
    assert [name[:10] for name in calls(two_workers.calls_dir)] == ["rank0-of2-", "rank1-of2-"]
    double = two_workers.run.output
    # Summing two shard gradients instead of one batch's reorders float64 additions only.
    torch.testing.assert_close(double["weight"], single.output["weight"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(double["bias"], single.output["bias"], rtol=1e-9, atol=1e-12)
    # ... and both really trained: near the weights the data were drawn from.
    torch.testing.assert_close(
        single.output["weight"].squeeze(0),
        torch.tensor(TRUE_WEIGHT, dtype=torch.float64),
        rtol=0.0,
        atol=0.05,
    )
    assert single.output["weight"].dtype == torch.float64


def test_rank_zero_progress_reaches_the_stage(two_workers: TwoWorkerRun) -> None:
    reports = two_workers.progress
    assert [r["epoch"] for r in reports] == [20, 40]
    assert {r["stage"] for r in reports} == {"train"}
    assert {r["rank"] for r in reports} == {0}
    assert all(R.TOTAL_COST in r for r in reports)  # the runner's running totals are added
    assert reports[-1]["loss"] < reports[0]["loss"]


def test_the_output_is_cached_once_and_loaded_without_workers(
    two_workers: TwoWorkerRun, tmp_path: Path
) -> None:
    pipeline, cache, first = two_workers.pipeline, two_workers.cache, two_workers.run
    trained = first.stages[1]
    assert (trained.name, trained.status, trained.stored) == ("train", "executed", True)
    # Charged worker-seconds: 2 workers x the stage's wall time, which holds rank 0's loop.
    assert trained.cost == trained.compute_cost
    assert trained.cost >= 2 * two_workers.progress[-1]["loop_seconds"]
    assert cache.contains(pipeline.prefix_keys({"score": {"scale": 1.0}})[1])
    started = calls(two_workers.calls_dir)

    second = pipeline.run(
        {"score": {"scale": 2.0}}, cache, trial_dir=tmp_path / "trial-2", meter=None
    )

    assert second.memoized_stages == 2
    assert calls(two_workers.calls_dir) == started  # no worker ran the loop again
    loaded = second.stages[1]
    assert loaded.status == "loaded"
    assert loaded.compute_cost == trained.compute_cost  # what the cache remembers
    assert loaded.cost == loaded.load_seconds  # charged the load, not the training again
    assert second.output["score"] == pytest.approx(2.0 * first.output["score"])
    torch.testing.assert_close(second.output["weight"], first.output["weight"], rtol=0, atol=0)


def test_a_tune_sweep_runs_the_stage_on_two_workers(ray_4cpu: Any, tmp_path: Path) -> None:
    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()
    # The loop hands its weights on as a checkpoint: the stage's output is its directory.
    pipeline = regression_pipeline("ray-train-sweep", calls_dir, num_workers=2, as_checkpoint=True)
    trainable = pipeline.as_trainable(
        cache=PrefixCache(str(tmp_path / "cache")), metric="score", meter=None
    )
    concurrent = max_concurrent_trials(pipeline, cpus=1)
    assert concurrent == 1  # 4 CPUs: one trial's CPU plus 2 workers, not two of them

    results = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"score": {"scale": tune.grid_search([1.0, 2.0])}},
        tune_config=tune.TuneConfig(
            metric="score", mode="max", max_concurrent_trials=concurrent, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=str(tmp_path / "tune"),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    ).fit()

    assert not results.errors
    by_scale = {r.config["score"]["scale"]: r.metrics for r in results}
    assert sorted(by_scale) == [1.0, 2.0]
    first, second = by_scale[1.0], by_scale[2.0]  # one at a time, in grid order
    assert math.isfinite(first["score"]) and first["score"] < 0
    assert first[R.stage_key(R.CACHE_HIT, "train")] == 0
    assert first[R.stage_key(R.STAGE_COST, "train")] > 0
    assert second[R.MEMOIZED_STAGES] == 2
    assert second[R.stage_key(R.CACHE_HIT, "train")] == 1
    assert second["score"] == pytest.approx(2.0 * first["score"])
    assert [name[:10] for name in calls(calls_dir)] == ["rank0-of2-", "rank1-of2-"]


# ---------------------------------------------------------- without Ray
def _loop(inputs: Any, params: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_workers": 0}, "num_workers=0 must be an integer >= 1"),
        ({"num_workers": -2}, "num_workers=-2"),
        ({"num_workers": 1.5}, "num_workers=1.5"),
        ({"num_workers": True}, "num_workers=True"),
        ({"backend": "mpi"}, "backend='mpi' must be one of"),
        ({"backend": "nccl"}, "backend='nccl' needs GPU workers"),
        ({"use_gpu": "yes"}, "use_gpu='yes' must be a bool"),
        ({"resources_per_worker": {"cpu": 2}}, "Ray names it 'CPU'"),
        ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker['CPU']=-1"),
        ({"resources_per_worker": {"CPU": math.inf}}, "resources_per_worker['CPU']=inf"),
        ({"resources_per_worker": {"CPU": 0}}, "asks for nothing"),
        ({"resources_per_worker": [("CPU", 1)]}, "must be a mapping"),
        ({"version": ""}, "version '' must be a non-empty string"),
    ],
)
def test_bad_options_name_the_stage_and_value(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(PipelineDefinitionError, match="stage 'train'") as raised:
        train_stage("train", _loop, {}, **arguments)
    assert message in str(raised.value)


def test_a_loop_that_cannot_take_inputs_and_params_is_refused() -> None:
    with pytest.raises(PipelineDefinitionError, match=r"stage 'fit'.*\(inputs, params\)"):
        train_stage("fit", lambda inputs: inputs, {})
    with pytest.raises(PipelineDefinitionError, match="stage 'fit': train_loop 3 is not callable"):
        train_stage("fit", 3, {})  # type: ignore[arg-type]


def test_the_worker_count_is_part_of_the_stage_version() -> None:
    two = train_stage("train", _loop, {}, num_workers=2, version="4")
    three = train_stage("train", _loop, {}, num_workers=3, version="4")
    assert (two.version, three.version) == ("4+2workers", "4+3workers")
    assert Pipeline("p", [two]).prefix_keys({}) != Pipeline("p", [three]).prefix_keys({})


def test_max_concurrent_trials_counts_each_trial_with_its_largest_worker_group() -> None:
    small = train_stage("small", _loop, {}, num_workers=2)
    large = train_stage("large", _loop, {}, num_workers=3, resources_per_worker={"CPU": 2})
    pipeline = Pipeline("p", [Stage("prep", _loop), small, large])
    # A trial: its own CPU + 3 workers x 2 CPUs (the stages run one at a time).
    assert max_concurrent_trials(pipeline, cluster={"CPU": 14}) == 2
    assert max_concurrent_trials(pipeline, cpus=0, cluster={"CPU": 12}) == 2

    gpu = train_stage("gpu", _loop, {}, num_workers=2, use_gpu=True)
    on_gpus = Pipeline("g", [gpu])
    # Ray Train's GPU workers ask for a GPU each and no CPU.
    assert max_concurrent_trials(on_gpus, cluster={"CPU": 64, "GPU": 8}) == 4
    assert max_concurrent_trials(on_gpus, gpus=1, cluster={"CPU": 64, "GPU": 8}) == 2
    with pytest.raises(ValueError, match=r"one trial needs 3 GPU .* the cluster has 2"):
        max_concurrent_trials(on_gpus, gpus=1, cluster={"CPU": 64, "GPU": 2})
    with pytest.raises(ValueError, match="cpus=-1"):
        max_concurrent_trials(pipeline, cpus=-1, cluster={"CPU": 4})
