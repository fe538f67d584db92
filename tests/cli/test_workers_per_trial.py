"""``eeipu-ray run --workers-per-trial N``: T5 trainer stages on Ray Train workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from eeipu_ray.cli import main
from eeipu_ray.pipelines import load_pipeline
from eeipu_ray.train import max_concurrent_trials

TRAINING = ("teacher", "distill1", "distill2", "distill3")


def test_t5_with_workers_trains_each_training_stage_on_a_worker_group() -> None:
    pipeline = load_pipeline("t5", workers=2)
    stages = {s.name: s for s in pipeline.stages}
    # The worker count is part of each training stage's version: an output
    # trained on another number of workers is never reused.
    assert all(stages[name].version.endswith("+2workers") for name in TRAINING)
    assert not stages["data"].version.endswith("workers")
    # The trial (1 CPU) plus its largest worker group (2 CPUs): 2 trials fit 8 CPUs,
    # so the worker groups are seen through the stage wrappers.
    assert max_concurrent_trials(pipeline, cpus=1, cluster={"CPU": 8}) == 2
    gpu = load_pipeline("t5", workers=2, use_gpu=True)
    assert max_concurrent_trials(gpu, cpus=1, cluster={"CPU": 8, "GPU": 4}) == 2
    # Without workers, nothing extra is reserved.
    assert max_concurrent_trials(load_pipeline("t5"), cpus=1, cluster={"CPU": 8}) == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["t5", "--workers-per-trial", "2", "--gpus-per-trial", "1"],
            "--gpus-per-trial 1 with --workers-per-trial 2",
        ),
        (["t5", "--workers-per-trial", "0"], "--workers-per-trial 0: give 1 or more"),
        (["synthetic", "--workers-per-trial", "2"], "does not take the options"),
    ],
)
def test_bad_worker_settings_are_named(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["run", *argv, "--budget", "5", "--storage-path", str(tmp_path)])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
