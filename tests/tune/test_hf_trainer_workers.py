"""A Hugging Face Trainer stage trained data-parallel on 2 Ray Train workers (CPU, Gloo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import T5ForConditionalGeneration

from eeipu_ray import PrefixCache
from tests.conftest import local_ray
from tests.pipeline.test_hf_trainer_stage import _pipeline


@pytest.fixture(scope="module")
def ray_3cpu() -> Iterator[Any]:
    """The trial's own CPU and a worker group of 2."""
    with local_ray(3) as ray:
        yield ray


def test_a_trainer_stage_on_two_workers_is_trained_once_and_cached(
    ray_3cpu: Any, tmp_path: Path
) -> None:
    pipeline = _pipeline("hf-t5-workers", batch_size=2, num_workers=2)
    assert pipeline.stages[1].version == "1+2workers"
    cache = PrefixCache(str(tmp_path / "cache"))
    config = {
        "data": {"source_len": 32},
        "finetune": {"learning_rate": 1e-3, "max_steps": 3, "dropout": 0.0, "seed": 0},
        "evaluate": {"scale": 1.0},
    }
    reports: list[dict] = []
    first = pipeline.run(
        config, cache, trial_dir=tmp_path / "trial-1", reporter=reports.append, meter=None
    )
    assert first.memoized_stages == 0
    assert torch.isfinite(torch.tensor(first.output["score"]))
    # Rank 0's per-step logs reached the stage, then the trainer's final metrics.
    steps = [r["step"] for r in reports if r.get("stage") == "finetune" and "loss" in r]
    assert steps == [1, 2, 3]
    finals = [r for r in reports if r.get("stage") == "finetune" and "train_loss" in r]
    assert finals and "eval_loss" in finals[-1]
    # The trial saved rank 0's model: it loads as a T5 model with trained weights.
    (model_dir,) = (tmp_path / "trial-1").rglob("finetune-model")
    model = T5ForConditionalGeneration.from_pretrained(str(model_dir))
    assert model.config.d_model == 16
    assert first.stages[1].status == "executed"

    again = dict(config, evaluate={"scale": 2.0})
    second = pipeline.run(again, cache, meter=None)
    assert second.memoized_stages == 2
    assert second.output["score"] == pytest.approx(2.0 * first.output["score"], rel=1e-6)
