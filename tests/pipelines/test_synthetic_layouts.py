"""The synthetic pipelines (paper, front4, back5 layouts), run against a real local PrefixCache."""

from __future__ import annotations

import copy
import pickle
import time

import pytest

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipelines import load_pipeline
from eeipu_ray.pipelines.synthetic import (
    LOAD_COST,
    build_pipeline,
    get_layout,
    synthetic_objective,
    synthetic_space,
    synthetic_stage_costs,
)
from eeipu_ray.search.space import SearchSpace

LAYOUT_NAMES = ["paper", "front4", "back5", "flat4", "costly3"]


def _config(layout: str, seed: int) -> dict[str, dict[str, float]]:
    stages = get_layout(layout).stage_names
    space = SearchSpace.from_tune(synthetic_space(layout), stage_order=stages)
    return space.from_unit(space.sample(1, seed=seed)[0])


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_build_names_stages_and_pickles(layout):
    pipeline = build_pipeline(layout=layout)
    assert pipeline.name == ("synthetic" if layout == "paper" else f"synthetic-{layout}")
    assert tuple(pipeline.stage_names) == get_layout(layout).stage_names
    config = _config(layout, seed=0)
    # Ray ships the pipeline to its workers: the stage functions pickle.
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone.prefix_keys(config) == pipeline.prefix_keys(config)
    assert clone.run(config).output == pipeline.run(config).output


def test_builtin_name_still_gives_the_paper_pipeline():
    pipeline = load_pipeline("synthetic")
    assert pipeline.name == "synthetic"
    assert pipeline.stage_names == ["stage1", "stage2", "stage3"]
    config = _config("paper", seed=4)
    assert pipeline.run(config).output["score"] == pytest.approx(synthetic_objective(config))


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_run_matches_objective_and_declared_costs_and_memoizes(layout, tmp_path):
    pipeline = build_pipeline(layout=layout)
    cache = PrefixCache(str(tmp_path / "cache"))
    config = _config(layout, seed=1)
    first = pipeline.run(config, cache)
    assert first.memoized_stages == 0
    assert first.output["score"] == pytest.approx(
        synthetic_objective(config, layout), rel=1e-12, abs=1e-12
    )
    costs = synthetic_stage_costs(config, layout)
    assert [s.compute_cost for s in first.stages] == pytest.approx(costs, rel=1e-12)
    assert [s.cost for s in first.stages] == pytest.approx(costs, rel=1e-12)

    # Same first two stages, new hyperparameters from stage 3 on.
    other = _config(layout, seed=2)
    second_config = copy.deepcopy(config)
    for stage in pipeline.stage_names[2:]:
        second_config[stage] = other[stage]
    second = pipeline.run(second_config, cache)
    assert second.memoized_stages == 2
    n = len(pipeline.stage_names)
    assert [s.status for s in second.stages] == ["loaded"] * 2 + ["executed"] * (n - 2)
    assert second.output["score"] == pytest.approx(
        synthetic_objective(second_config, layout), rel=1e-12, abs=1e-12
    )
    new_costs = synthetic_stage_costs(second_config, layout)
    assert [s.cost for s in second.stages] == pytest.approx([LOAD_COST] * 2 + new_costs[2:])
    assert [s.compute_cost for s in second.stages] == pytest.approx(new_costs)
    assert second.output["score"] != first.output["score"]


def test_layouts_do_not_share_cache_entries(tmp_path):
    cache = PrefixCache(str(tmp_path / "cache"))
    paper, front4 = build_pipeline(), build_pipeline(layout="front4")
    config = _config("front4", seed=3)
    # Stage 1 is named, bounded and valued alike in both; only the pipeline name differs.
    paper_config = {**_config("paper", seed=3), "stage1": config["stage1"]}
    paper.run(paper_config, cache)
    assert paper.run(paper_config, cache).memoized_stages == 2
    assert front4.run(config, cache).memoized_stages == 0


def test_time_scale_sleeps_in_proportion_to_the_declared_cost():
    pipeline = build_pipeline(time_scale=0.01, layout="back5")
    config = _config("back5", seed=5)
    start = time.perf_counter()
    pipeline.run(config)
    assert time.perf_counter() - start >= 0.01 * sum(synthetic_stage_costs(config, "back5"))


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"unknown synthetic layout 'wide'.*'paper'"):
        build_pipeline(layout="wide")
