"""The engine's initial design, repeat avoidance, lookahead and warm restarts."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from ray import tune

from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace
from tests.search.test_engine import FAST


def _space() -> SearchSpace:
    return SearchSpace.from_tune(
        {"prep": {"a": tune.uniform(0, 1)}, "train": {"b": tune.uniform(0, 1)}}
    )


def _result(config: dict, cost_scale: float = 1.0) -> dict:
    a, b = config["prep"]["a"], config["train"]["b"]
    # Stage 1's cost grows 150-fold across the range of `a`; the score does not
    # care much about `a`, so a cheap design gives up little.
    costs = [cost_scale * math.exp(5.0 * a), 1.0]
    out = {"score": -((b - 0.4) ** 2) - 0.1 * (a - 0.5) ** 2, "memoized_stages": 0}
    for s, c in zip(("prep", "train"), costs, strict=True):
        out[f"stage_costs/{s}"] = c
        out[f"compute_costs/{s}"] = c
    return out


def _run_warmup(n: int = 12, seed: int = 0) -> list[dict]:
    engine = BOEngine(_space(), EngineOptions(n_warmup=n, seed=seed, acquisition="eeipu", **FAST))
    configs = []
    for i in range(n):
        config = engine.suggest(f"t{i}")
        assert engine.store[f"t{i}"].phase == "warmup"
        engine.on_result(f"t{i}", _result(config))
        configs.append(config)
    xs = torch.stack([r.x for r in engine.records])
    assert float(torch.pdist(xs).min()) > 1e-3, "the design repeated a point"
    return configs


def test_warmup_is_a_diverse_sobol_design_reproducible_from_its_seed() -> None:
    assert _run_warmup(seed=0) == _run_warmup(seed=0)
    assert _run_warmup(seed=0) != _run_warmup(seed=1)


def test_add_evaluated_counts_towards_the_warmup() -> None:
    engine = BOEngine(_space(), EngineOptions(n_warmup=3, **FAST))
    for i in range(3):
        x = torch.tensor([0.2 + 0.3 * i, 0.1 + 0.3 * i], dtype=torch.double)
        config = engine.space.from_unit(x)
        engine.add_evaluated(f"given{i}", config, _result(config))
    assert engine.next_is_bo()
    engine.suggest("t0")
    assert engine.store["t0"].phase == "bo"


def test_bo_does_not_repeat_a_config_at_the_boundary() -> None:
    # The optimum sits on the cube's corner (x = 1, c = "a"): EI's maximizer
    # lands there again and again once it was tried (measured: three repeats in
    # eight trials without the check). Kind (a): no repeat is structural (the
    # check); the corner was reached by trial 3 to 5 of 8 for seeds 0-7.
    space = SearchSpace.from_tune(
        {"s": {"x": tune.uniform(0, 1)}, "t": {"c": tune.choice(["a", "b"])}}
    )
    engine = BOEngine(space, EngineOptions(acquisition="ei", n_warmup=2, seed=1, **FAST))
    seen = []
    for i in range(8):
        config = engine.suggest(f"t{i}")
        seen.append((config["s"]["x"], config["t"]["c"]))
        score = 3 * config["s"]["x"] + (config["t"]["c"] == "a")
        engine.on_result(f"t{i}", {"score": score, "total_cost": 1.0})
    assert (1.0, "a") in seen
    assert len(set(seen)) == len(seen), seen


def test_an_all_discrete_space_is_optimized_without_gradients() -> None:
    # Kind (a), structural: six trials, six values, and no config is repeated.
    space = SearchSpace.from_tune({"s": {"c": tune.choice([0, 1, 2, 3, 4, 5])}})
    engine = BOEngine(space, EngineOptions(acquisition="ei", n_warmup=2, seed=1, **FAST))
    seen = []
    for i in range(6):
        config = engine.suggest(f"t{i}")
        seen.append(config["s"]["c"])
        engine.on_result(f"t{i}", {"score": -abs(config["s"]["c"] - 2), "total_cost": 1.0})
    assert sorted(seen) == [0, 1, 2, 3, 4, 5], seen


def _engine_after_bo(**kwargs) -> BOEngine:
    engine = BOEngine(_space(), EngineOptions(n_warmup=4, seed=3, **{**FAST, **kwargs}))
    for i in range(7):
        config = engine.suggest(f"t{i}")
        engine.on_result(f"t{i}", _result(config))
    return engine


def test_restored_engine_warm_starts_its_gps_and_proposes_the_same_point() -> None:
    engine = _engine_after_bo()
    state = engine.state_dict()
    assert set(state["gp"]) >= {"objective", "cost/0", "cost/1"}
    clone = BOEngine(_space(), engine.options)
    clone.load_state_dict(state)
    a, b = engine.suggest("next"), clone.suggest("next")
    assert a == b
    # A checkpoint without GP state (older format) still loads: cold fits.
    clone2 = BOEngine(_space(), engine.options)
    clone2.load_state_dict({k: v for k, v in state.items() if k != "gp"})
    assert isinstance(clone2.suggest("next"), dict)


def test_lookahead_runs_in_a_thread_on_a_snapshot() -> None:
    engine = BOEngine(_space(), EngineOptions(n_warmup=4, seed=5, **FAST))
    assert engine.lookahead() is None  # warm-up: nothing to look ahead to
    for i in range(4):
        config = engine.suggest(f"w{i}")
        engine.on_result(f"w{i}", _result(config))
    running = engine.suggest("r0")  # a trial in flight
    compute = engine.lookahead()
    assert compute is not None
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("p", compute()))
    worker.start()
    engine.on_result("r0", _result(running))  # a result lands meanwhile
    worker.join(timeout=600)
    proposal = box["p"]
    assert proposal.version < engine.store.version  # computed before the result
    config = engine.suggest("r1", lookahead=proposal)
    assert config == proposal.config and engine.store["r1"].phase == "bo"


def test_a_lookahead_that_repeats_a_config_is_dropped() -> None:
    engine = _engine_after_bo()
    compute = engine.lookahead()
    assert compute is not None
    proposal = compute()
    # The same config was suggested meanwhile (by another path): do not repeat it.
    engine.register("dup", proposal.config)
    config = engine.suggest("next", lookahead=proposal)
    assert config is not None and config != proposal.config


def test_a_batch_starts_with_the_sequential_proposal_and_spreads_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kind (b): what the greedy batch guarantees, whatever the GP and the optimizer
    # find. How far apart the points land is not guaranteed (other seeds give
    # proposals 1e-7 apart that share a cached prefix), so it is not asserted.
    engine = _engine_after_bo()
    running = engine.suggest("r0")
    assert running is not None
    single = engine.lookahead_batch(q=1)
    batch = engine.lookahead_batch(q=5)
    assert single is not None and batch is not None
    (alone,) = single()
    pending_seen: list[list[dict]] = []
    real_acquisition = engine._acquisition

    def acquisition_spy(parts, store, available, *rest):  # type: ignore[no-untyped-def]
        pending_seen.append([r.config for r in store.pending])
        return real_acquisition(parts, store, available, *rest)

    monkeypatch.setattr(engine, "_acquisition", acquisition_spy)
    proposals = batch()
    assert len(proposals) == 5
    assert proposals[0].config == alone.config  # one optimization; the first is its maximizer
    # Each later point was chosen with the earlier ones (and the running trial) believed ...
    assert pending_seen == [[running] + [p.config for p in proposals[:j]] for j in range(5)]
    # ... and none repeats another or the running trial (the engine's repeat rule).
    X = engine.space.snap(torch.stack([engine.space.to_unit(p.config) for p in proposals]))
    X = torch.cat([X, engine.space.snap(engine.store["r0"].x.unsqueeze(0))])
    gaps = (X.unsqueeze(0) - X.unsqueeze(1)).abs().amax(-1) + torch.eye(X.shape[0])
    assert float(gaps.min()) > 1e-9
    # A batch computed while the first one is still queued does not repeat it.
    more = engine.lookahead_batch(q=3, reserved=proposals)
    assert more is not None
    for p in more():
        assert all(p.config != r.config for r in proposals)
    with pytest.raises(ValueError, match="q=0"):
        engine.lookahead_batch(q=0)


def test_the_believer_incumbent_is_the_best_believed_pending_value() -> None:
    from eeipu_ray.search.models import GPFitter, MarginalGP

    X = torch.rand(12, 2, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    y = (X.sum(-1, keepdim=True) - 1.0) ** 2
    gp = GPFitter([0, 0]).fit("objective", X, y)
    assert MarginalGP(gp).believed_max is None
    pending = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]], dtype=torch.double)
    fast = MarginalGP(gp, X_pending=pending)
    # Kind (b): an identity of the believer (the believed values are the posterior
    # means), whatever the fitted hyperparameters; the tolerance is for rounding.
    with torch.no_grad():
        means = gp.posterior(pending).mean.reshape(-1)
    assert fast.believed_max == pytest.approx(float(means.max()), rel=1e-6, abs=1e-8)


def _costed(score: float, cost: float) -> dict:
    return {"score": score, "stage_costs/prep": cost, "stage_costs/train": 0.0}


@pytest.mark.parametrize("reserve", [True, False])
def test_running_trials_reserve_their_expected_cost(reserve: bool) -> None:
    engine = BOEngine(
        _space(), EngineOptions(n_warmup=10, budget=20.0, reserve_pending=reserve, **FAST)
    )
    for i, cost in enumerate((3.0, 5.0)):
        engine.suggest(f"t{i}")
        engine.on_result(f"t{i}", _costed(0.0, cost))
    for i in range(3):
        engine.suggest(f"r{i}")
    assert engine.budget_spent == pytest.approx(8.0)
    # Three running trials, expected 4 each (the mean so far): 8 + 12 = 20.
    assert engine.budget_committed == pytest.approx(20.0 if reserve else 8.0)
    assert engine.can_start() is (not reserve)
    engine.on_result("r0", _costed(0.0, 1.0))  # cheaper than expected: room again
    assert engine.budget_committed == pytest.approx(9.0 + 2 * 3.0 if reserve else 9.0)
    assert engine.can_start()
    engine.on_result("r1", _costed(0.0, 11.0))
    assert engine.budget_left == pytest.approx(0.0)
    assert not engine.can_start()
    assert engine.suggest("late") is None  # spent: no more trials
