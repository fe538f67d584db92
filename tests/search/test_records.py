"""Trial records and the store: parsing, failures, budget, idempotence."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from eeipu_ray.search.errors import TrialStateError
from eeipu_ray.search.records import TrialRecord, TrialStatus, TrialStore

STAGES = ["prep", "train", "eval"]


def _result(score=1.0, spent=(1.0, 2.0, 3.0), compute=None, memoized=0, keys=True, **extra):
    result = {"memoized_stages": memoized, "total_cost": sum(spent)}
    if score is not None:
        result["score"] = score
    for k, s in enumerate(STAGES):
        result[f"stage_costs/{s}"] = spent[k]
        result[f"compute_costs/{s}"] = (compute or spent)[k]
        result[f"load_seconds/{s}"] = spent[k] if k < memoized else 0.0
        result[f"cache_hit/{s}"] = int(k < memoized)
        if keys:
            result[f"prefix_key/{s}"] = f"key-{k}"
    result.update(extra)
    return result


def _store(mode="max") -> TrialStore:
    return TrialStore(STAGES, metric="score", mode=mode)


def test_completion_parses_the_flat_schema():
    store = _store()
    store.add_pending("t", {"a": 1}, torch.tensor([0.5]))
    assert store.complete(
        "t", _result(score=2.5, spent=(0.1, 0.1, 3.0), compute=(4.0, 5.0, 3.0), memoized=2)
    )
    r = store["t"]
    assert r.status is TrialStatus.COMPLETED
    assert r.objective == 2.5
    assert r.stage_costs == [0.1, 0.1, 3.0]
    assert r.compute_costs == [4.0, 5.0, 3.0]
    assert r.memoized_stages == 2
    assert r.prefix_keys == ["key-0", "key-1", "key-2"]
    assert r.charged_cost == pytest.approx(3.2)
    assert r.loaded_cost == pytest.approx(0.2)
    assert store.budget_spent == pytest.approx(3.2)


def test_min_mode_flips_sign_once():
    store = _store(mode="min")
    store.add_pending("t", {}, torch.zeros(1))
    store.complete("t", _result(score=0.75))
    assert store["t"].objective == -0.75
    _, Y = store.train_xy()
    assert Y.tolist() == [[-0.75]]


@pytest.mark.parametrize(
    ("score", "error", "reason"),
    [
        (math.nan, False, "nan"),
        (math.inf, False, "inf"),
        (-math.inf, False, "-inf"),
        (None, False, "lacks the metric"),
        ("oops", False, "not a number"),
        (1.0, True, "error"),
        (1.0, "CUDA out of memory", "CUDA out of memory"),
    ],
    ids=["nan", "+inf", "-inf", "missing", "string", "error", "error-message"],
)
def test_failures_are_charged_and_have_no_objective(score, error, reason):
    store = _store()
    store.add_pending("ok", {}, torch.zeros(1))
    store.complete("ok", _result(score=1.0, spent=(1.0, 1.0, 1.0)))
    store.add_pending("bad", {}, torch.zeros(1))
    store.complete("bad", _result(score=score, spent=(2.0, 3.0, 4.0)), error=error)
    r = store["bad"]
    assert r.status is TrialStatus.FAILED
    assert r.objective is None
    assert reason in r.error
    assert r.charged_cost == 9.0
    assert store.budget_spent == 12.0
    assert [x.trial_id for x in store.completed] == ["ok"]
    # failed trials still carry their compute costs (the cost GPs learn from them)
    assert r.compute_costs == [2.0, 3.0, 4.0]


def test_error_without_result_charges_nothing_and_fails():
    store = _store()
    store.add_pending("t", {}, torch.zeros(1))
    store.complete("t", None, error=True)
    assert store["t"].status is TrialStatus.FAILED
    assert store.budget_spent == 0.0


def test_second_completion_is_ignored_with_a_debug_log(caplog):
    store = _store()
    store.add_pending("t", {}, torch.zeros(1))
    assert store.complete("t", _result(score=1.0))
    version = store.version
    with caplog.at_level(logging.DEBUG, logger="eeipu_ray.search.records"):
        assert not store.complete("t", _result(score=99.0, spent=(50.0, 50.0, 50.0)))
    assert "second completion ignored" in caplog.text
    assert store["t"].objective == 1.0
    assert store.budget_spent == 6.0
    assert store.version == version


def test_total_cost_is_the_charge_without_stage_costs():
    store = _store()
    store.add_pending("t", {}, torch.zeros(1))
    store.complete("t", {"score": 1.0, "total_cost": 7.5})
    assert store.budget_spent == 7.5
    assert store["t"].compute_costs == [None, None, None]


def test_spent_cost_of_an_executed_stage_stands_in_for_its_compute_cost():
    store = _store()
    store.add_pending("t", {}, torch.zeros(1))
    store.complete(
        "t",
        {
            "score": 1.0,
            "memoized_stages": 1,
            "stage_costs/prep": 0.1,
            "stage_costs/train": 2.0,
            "stage_costs/eval": 3.0,
        },
    )
    # prep was loaded: its spent cost is a load, not a compute cost
    assert store["t"].compute_costs == [None, 2.0, 3.0]


def test_bad_cost_values_are_not_charged():
    store = _store()
    store.add_pending("t", {}, torch.zeros(1))
    store.complete("t", _result(spent=(1.0, math.nan, -3.0)))
    assert store["t"].stage_costs == [1.0, None, None]
    assert store.budget_spent == 1.0


def test_unknown_and_duplicate_ids():
    store = _store()
    with pytest.raises(TrialStateError, match="unknown trial id 'x'"):
        store.complete("x", _result())
    store.add_pending("t", {}, torch.zeros(1))
    with pytest.raises(TrialStateError, match="already suggested"):
        store.add_pending("t", {}, torch.zeros(1))


def test_pending_keys_kept_unless_the_result_reports_them():
    store = _store()
    store.add_pending("t", {}, torch.zeros(1), prefix_keys=["p0", "p1", "p2"])
    store.complete("t", _result(keys=False))
    assert store["t"].prefix_keys == ["p0", "p1", "p2"]
    store.add_pending("u", {}, torch.zeros(1), prefix_keys=["p0", "p1", "p2"])
    store.complete("u", _result(keys=True))
    assert store["u"].prefix_keys == ["key-0", "key-1", "key-2"]


def test_training_data_comes_from_records_not_completion_order():
    store = _store()
    for i in range(4):
        store.add_pending(f"t{i}", {}, torch.tensor([i / 10]))
    # complete in a scrambled order
    for i in (2, 0, 3, 1):
        store.complete(f"t{i}", _result(score=float(i)))
    X, Y = store.train_xy()
    # every x is paired with its own trial's objective (y = 10 x by construction)
    assert torch.allclose(Y[:, 0], 10 * X[:, 0])
    assert [r.trial_id for r in store.top(2)] == ["t3", "t2"]


def test_record_dict_round_trip_is_json_able():
    store = _store()
    store.add_pending("t", {"prep": {"n": 3}}, torch.tensor([0.25, 0.5]), phase="warmup")
    store.complete("t", _result(memoized=1))
    data = json.loads(json.dumps(store["t"].to_dict()))
    back = TrialRecord.from_dict(data)
    assert back.to_dict() == store["t"].to_dict()
    assert torch.equal(back.x, store["t"].x)


def test_invalid_mode():
    with pytest.raises(ValueError, match="mode"):
        TrialStore(STAGES, mode="maximize")


def test_the_stage_a_failed_trial_died_in_teaches_no_compute_cost() -> None:
    store = TrialStore(["a", "b", "c"])
    store.add_pending("t", {}, torch.zeros(0))
    store.complete(
        "t",
        {
            "score": float("nan"),
            "stage_failed": 1,
            "memoized_stages": 0,
            "stage_costs/a": 2.0,
            "stage_costs/b": 0.5,
        },
    )
    record = store["t"]
    assert record.charged_cost == 2.5
    assert record.compute_costs == [2.0, None, None]
