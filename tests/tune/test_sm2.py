"""SM2Scheduler: decision logic driven with a stand-in controller (as Ray's own
scheduler tests do), then one real Tune run on the CNN pipeline with
EEIPUSearcher, a batch size that does not fit, and early stopping."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from eeipu_ray.errors import EnergyMeterError
from eeipu_ray.pipelines import cnn
from eeipu_ray.tune import SM2Scheduler, fits_device_memory, sm2_score
from eeipu_ray.tune.sm2 import SM2Options
from tests.energy.fakes import FakeNVML

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


class Controller:
    """What a scheduler may call on Tune's controller: the trials and stop_trial."""

    def __init__(self) -> None:
        self.trials: list[Trial] = []
        self.stopped: list[str] = []

    def get_trials(self) -> list[Trial]:
        return self.trials

    def stop_trial(self, trial: Trial) -> None:
        trial.set_status(Trial.TERMINATED)
        self.stopped.append(trial.trial_id)


def add(scheduler: Any, controller: Controller, trial_id: str, config: dict | None = None):
    trial = Trial("__fake", config=config or {}, trial_id=trial_id, stub=True)
    controller.trials.append(trial)
    scheduler.on_trial_add(controller, trial)
    return trial


def sm2(**kwargs: Any) -> SM2Scheduler:
    kwargs.setdefault("max_t", 9)
    kwargs.setdefault("grace_period", 1)
    kwargs.setdefault("reduction_factor", 3)
    return SM2Scheduler("epoch", "acc", "max", **kwargs)


# ---------------------------------------------------------------- options and score
@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"grace_period": 0}, "grace_period"),
        ({"max_t": 0.5}, "max_t"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"energy_weight": -0.1}, "energy_weight"),
        ({"energy_weight": math.inf}, "energy_weight"),
        ({"lr_weight": 0.1}, "lr_key"),
        ({"energy_attr": ""}, "energy_attr"),
        ({"energy_floor": 0}, "energy_floor"),
    ],
)
def test_options_name_the_culprit(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        SM2Options(**kwargs)


def test_rungs_in_epochs_or_energy():
    # Below max_t: a rung at the end of training could save nothing.
    assert SM2Options(max_t=9, grace_period=1, reduction_factor=3).milestones == [1, 3]
    assert SM2Options(max_t=10, grace_period=2, reduction_factor=2).milestones == [2, 4, 8]
    energy = SM2Options(
        time_attr="total_energy_joules", max_t=2e4, grace_period=100, reduction_factor=10
    )
    assert energy.milestones == [100, 1000, 10000]


def test_score_formula_is_unit_free_in_energy():
    # S = P - alpha ln E + beta ln lr
    assert sm2_score(0.9, math.e**2, energy_weight=0.05) == pytest.approx(0.9 - 0.1)
    assert sm2_score(0.9, 10.0, 0.01, energy_weight=0.0, lr_weight=0.02) == pytest.approx(
        0.9 + 0.02 * math.log(0.01)
    )
    # Joules or kilojoules (or CPU-seconds): the same ranking.
    pairs = [(0.80, 100.0), (0.83, 400.0), (0.70, 20.0)]
    orders = {
        tuple(sorted(range(3), key=[sm2_score(p, e * scale) for p, e in pairs].__getitem__))
        for scale in (1e-3, 1.0, 3.6e6)
    }
    assert orders == {(1, 2, 0)}  # 0.83 at 4x the energy ranks last, 0.80 first
    assert sm2_score(0.5, 0.0) == sm2_score(0.5, 1e-6)  # the floor: 0 J does not win outright


# ---------------------------------------------------------------- decisions
def test_with_no_energy_weight_it_decides_exactly_as_asha():
    rng = random.Random(3)
    asha = ASHAScheduler(
        time_attr="epoch", metric="acc", mode="max", max_t=9, grace_period=1, reduction_factor=3
    )
    ours = sm2(energy_weight=0.0, stop_last_trials=True)
    controllers = Controller(), Controller()
    live: dict[str, int] = {}
    for i in range(12):
        for s, c in zip((asha, ours), controllers, strict=True):
            add(s, c, f"t{i}")
        live[f"t{i}"] = 0
    decisions: list[tuple[str, str]] = []
    while live:
        trial_id = rng.choice(sorted(live))
        live[trial_id] += 1
        epoch = live[trial_id]
        result = {
            "epoch": epoch,
            "acc": rng.random() * 0.5 + 0.05 * epoch,
            "total_energy_joules": rng.uniform(1, 100),
        }
        actions = [
            s.on_trial_result(c, next(t for t in c.trials if t.trial_id == trial_id), result)
            for s, c in zip((asha, ours), controllers, strict=True)
        ]
        decisions.append(tuple(actions))
        if actions[0] == STOP or epoch >= 9:
            del live[trial_id]
    assert all(a == b for a, b in decisions)
    assert sum(a == STOP for a, _ in decisions) >= 6  # the sequence did stop trials


def test_energy_decides_between_similar_performers():
    # Two trials at the first rung: b is 2 points better but spent 4x the energy.
    for weight, expected in ((0.0, CONTINUE), (0.05, STOP)):
        scheduler, controller = sm2(energy_weight=weight), Controller()
        a, b = add(scheduler, controller, "a"), add(scheduler, controller, "b")
        first = {"epoch": 1, "acc": 0.80, "total_energy_joules": 100.0}
        assert scheduler.on_trial_result(controller, a, first) == CONTINUE
        second = {"epoch": 1, "acc": 0.82, "total_energy_joules": 400.0}
        assert scheduler.on_trial_result(controller, b, second) == expected
    # With the energy term, a cheap trial somewhat worse continues past an expensive one.
    scheduler, controller = sm2(), Controller()
    a, c = add(scheduler, controller, "a"), add(scheduler, controller, "c")
    scheduler.on_trial_result(
        controller, a, {"epoch": 1, "acc": 0.82, "total_energy_joules": 400.0}
    )
    cheap = {"epoch": 1, "acc": 0.80, "total_energy_joules": 100.0}
    assert scheduler.on_trial_result(controller, c, cheap) == CONTINUE
    log = scheduler.decisions[-1]
    assert log["trial_id"] == "c" and log["rung"] == 1.0 and log["action"] == "continue"
    assert log["score"] == pytest.approx(0.80 - 0.05 * math.log(100.0))


def test_learning_rate_term_reads_the_config():
    scheduler, controller = sm2(energy_weight=0.0, lr_key="train/lr", lr_weight=-0.05), Controller()
    high = add(scheduler, controller, "high", {"train": {"lr": 0.1}})
    low = add(scheduler, controller, "low", {"train": {"lr": 0.001}})
    scheduler.on_trial_result(controller, high, {"epoch": 1, "acc": 0.60})
    # 10 points worse after one epoch, but with a learning rate 100x smaller:
    # the short-horizon correction (beta < 0) lets it continue.
    assert scheduler.on_trial_result(controller, low, {"epoch": 1, "acc": 0.50}) == CONTINUE
    assert scheduler.score(low, {"acc": 0.5}) == pytest.approx(0.5 - 0.05 * math.log(0.001))


def test_missing_energy_is_refused_or_ranked_by_cpu_seconds():
    scheduler, controller = sm2(), Controller()
    trial = add(scheduler, controller, "t")
    with pytest.raises(EnergyMeterError, match="total_cpu_seconds"):
        scheduler.on_trial_result(controller, trial, {"epoch": 1, "acc": 0.5})
    # Where no meter exists: process CPU time, labelled as such, ranks instead.
    scheduler, controller = sm2(energy_attr="total_cpu_seconds"), Controller()
    trial = add(scheduler, controller, "t")
    result = {"epoch": 1, "acc": 0.5, "total_cpu_seconds": 2.0}
    assert scheduler.on_trial_result(controller, trial, result) == CONTINUE
    # Results without the metric (a data stage's progress) are not judged.
    assert scheduler.on_trial_result(controller, trial, {"epoch": 3}) == CONTINUE
    assert (
        scheduler.on_trial_result(
            controller, trial, {"epoch": 9, "acc": 0.9, "total_cpu_seconds": 5.0}
        )
        == CONTINUE
    )
    # ASHA's stop at max_t, on request.
    scheduler = sm2(energy_attr="total_cpu_seconds", stop_last_trials=True)
    trial = add(scheduler, controller, "u")
    assert (
        scheduler.on_trial_result(
            controller, trial, {"epoch": 9, "acc": 0.9, "total_cpu_seconds": 5.0}
        )
        == STOP
    )


def test_a_batch_that_does_not_fit_never_starts():
    fits = fits_device_memory(cnn.training_memory_bytes, 64 * 2**20)  # a 64 MiB device
    base = {"data": {"image_size": 16, "copies": 0}}
    small = {**base, "train": {"width": 8, "batch_size": 64}}
    huge = {**base, "train": {"width": 24, "batch_size": 1024}}
    assert fits(small) and not fits(huge)
    scheduler, controller = sm2(energy_weight=0.0, fits=fits), Controller()
    too_big = add(scheduler, controller, "huge", huge)
    ok = add(scheduler, controller, "small", small)
    # Tune asks which trial to run before it starts actors for pending trials.
    assert scheduler.choose_trial_to_run(controller) is ok
    assert controller.stopped == ["huge"] and too_big.status == Trial.TERMINATED
    assert scheduler.choose_trial_to_run(controller) is ok  # idempotent
    assert controller.stopped == ["huge"]
    assert scheduler.decisions[0] == {
        "trial_id": "huge",
        "rung": None,
        "action": "skip",
        "reason": "does not fit the device",
    }
    # Had it started anyway, its first result stops it.
    assert scheduler.on_trial_result(controller, too_big, {"epoch": 1, "acc": 1.0}) == STOP
    assert "not fitting=1" in scheduler.debug_string()


def test_device_memory_auto_reads_the_smallest_gpu():
    nvml = FakeNVML.with_gpus(2)
    nvml.gpus[1].memory_bytes = 16 * 2**30
    fits = fits_device_memory(lambda c: c["bytes"], "auto", headroom=0.5, nvml=nvml)
    assert fits({"bytes": 8 * 2**30}) and not fits({"bytes": 8 * 2**30 + 1})
    assert nvml.inits == nvml.shutdowns == 1
    with pytest.raises(EnergyMeterError, match="device_memory"):
        fits_device_memory(lambda c: 0, "auto", nvml=FakeNVML(fail_init=True))


def test_state_survives_save_and_restore(tmp_path):
    scheduler, controller = sm2(), Controller()
    trial = add(scheduler, controller, "a")
    scheduler.on_trial_result(
        controller, trial, {"epoch": 1, "acc": 0.7, "total_energy_joules": 5.0}
    )
    scheduler.save(str(tmp_path / "sm2.pkl"))
    fresh = sm2()
    fresh.restore(str(tmp_path / "sm2.pkl"))
    assert fresh.rungs == scheduler.rungs and fresh.rungs[0][1] == {
        "a": pytest.approx(0.7 - 0.05 * math.log(5.0))
    }


# ---------------------------------------------------------------- a real Tune run
def test_tune_run_with_eeipu_searcher_stops_early_and_skips_what_does_not_fit(
    ray_local: Any, tmp_path: Path
) -> None:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.search import EngineOptions
    from eeipu_ray.tune import EEIPUSearcher

    pipeline = cnn.build_pipeline(n_samples=200, image_size=8, max_epochs=3, report_score=True)
    space = pipeline.search_space
    space["train"]["batch_size"] = tune.choice([32, 4096])
    pipeline = type(pipeline)(pipeline.name, pipeline.stages, space=space)
    cache = PrefixCache(tmp_path / "cache")
    data = {"copies": 0, "max_shift": 0, "noise": 0.0, "normalize": "standard"}
    evaluate = {"tta": "none", "temperature": 1.0}

    def config(lr: float, batch: int) -> dict[str, Any]:
        train = {"lr": lr, "weight_decay": 1e-4, "epochs": 3, "width": 8, "batch_size": batch}
        return {"data": data, "train": train, "evaluate": evaluate}

    points = [config(3e-2, 32), config(1e-3, 32), config(3e-2, 4096), config(2e-2, 32)]
    searcher = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        cache=cache,
        budget=None,
        points_to_evaluate=points,
        max_concurrent=1,
        options=replace(
            EngineOptions(num_restarts=2, raw_samples=32, mc_samples=32, maxiter=10), n_warmup=2
        ),
    )
    scheduler = SM2Scheduler(
        "epoch",
        energy_attr="total_cpu_seconds",
        max_t=3,
        grace_period=1,
        reduction_factor=2,
        # Rank by score alone: CPU-seconds vary with the machine's load, and a
        # rung decision read from them would too.
        energy_weight=0.0,
        # A 1 MiB "device": the estimate reads the pipeline's constants (image size, ...).
        fits=fits_device_memory(
            functools.partial(cnn.training_memory_bytes, pipeline=pipeline), 2**20
        ),
    )
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=4,
            metric="score",
            mode="max",
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), name="sm2", verbose=0),
    ).fit()
    # The 4096 batch never trained: Tune has no result (not even a config) for it ...
    ran = [r for r in grid if r.config]
    assert len(list(grid)) == 4 and len(ran) == 3
    by_batch = {(r.config["train"]["lr"], r.config["train"]["batch_size"]): r for r in ran}
    assert (3e-2, 4096) not in by_batch
    # ... and the searcher, told it ended without a result, charged nothing for it.
    skipped = [d for d in scheduler.decisions if d["action"] == "skip"]
    assert len(skipped) == 1
    record = searcher.engine.store[skipped[0]["trial_id"]]
    assert record.status.value == "failed" and record.charged_cost == 0.0
    # The slow learner (lr 1e-3) ranked below the first trial at the first rung and
    # stopped there: its last result is the epoch-1 progress with its CPU-seconds.
    slow = by_batch[(1e-3, 32)].metrics
    assert slow["epoch"] == 1 and "memoized_stages" not in slow
    assert slow["total_cpu_seconds"] > 0
    assert [d["action"] for d in scheduler.decisions if d["trial_id"] == slow["trial_id"]] == [
        "stop"
    ]
    # ... and the searcher was charged what it spent (seconds so far), not 0.
    assert searcher.engine.store[slow["trial_id"]].charged_cost == pytest.approx(slow["total_cost"])
    finished = by_batch[(3e-2, 32)].metrics
    # Kind (a), by margin: seeded training measured at 0.56 (28 of 50 images; chance
    # is 0.1); rounding-level changes (1e-7 on the initial weights, 1 or 2 threads)
    # moved its nll by 1e-7 and no image across the decision boundary.
    assert finished["memoized_stages"] == 0 and finished["score"] > 0.5
    assert finished["cpu_seconds/train"] > 0 and finished["energy_source/train"] == "none"
