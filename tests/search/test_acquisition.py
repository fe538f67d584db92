"""Acquisition formulas, checked numerically with mock posteriors (no GP fitting)."""

from __future__ import annotations

import math

import pytest
import torch
from botorch.acquisition import LogExpectedImprovement
from botorch.exceptions.errors import UnsupportedError
from botorch.sampling import StochasticSampler
from botorch.utils.testing import MockModel, MockPosterior

from eeipu_ray.search.acquisition import (
    CachedPrefixes,
    CostAwareLogEI,
    LogCArBO,
    LogEEIPU,
    LogEIPS,
    LogExpectedInverseCost,
    RandomProposer,
    _log_expected_inverse_cost,
)

D = torch.double


def _objective(b: int = 3) -> MockModel:
    mean = torch.tensor([0.2, 1.0, -0.5], dtype=D)[:b].reshape(b, 1, 1)
    variance = torch.tensor([0.3, 0.1, 2.0], dtype=D)[:b].reshape(b, 1, 1)
    return MockModel(MockPosterior(mean=mean, variance=variance))


# Known stage-cost samples: n = 4 samples, b = 3 points, K = 3 stages.
COSTS = torch.tensor(
    [
        [[1.0, 2.0, 1.0], [4.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        [[3.0, 2.0, 1.0], [4.0, 3.0, 1.0], [1.0, 1.0, 1.0]],
        [[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [2.0, 3.0, 2.0]],
        [[2.0, 2.0, 2.0], [8.0, 1.0, 3.0], [1.0, 2.0, 1.0]],
    ],
    dtype=D,
).unsqueeze(-2)  # 4 x 3 x 1 x 3
EPS = torch.tensor([0.0, 0.5, 0.25], dtype=D)


def _cost_model(costs: torch.Tensor = COSTS) -> MockModel:
    _, b, q, k = costs.shape
    return MockModel(MockPosterior(samples=costs.log(), base_shape=torch.Size([b, q, k])))


def _by_hand(costs: torch.Tensor, delta: list[int], eps: torch.Tensor) -> list[float]:
    """log of the sample mean of 1 / (eps(delta) + sum_{k >= delta} C_k), per point."""
    out = []
    for j, dl in enumerate(delta):
        inv = [
            1.0 / (float(eps[dl]) * (dl > 0) + float(costs[s, j, 0, dl:].sum()))
            for s in range(costs.shape[0])
        ]
        out.append(math.log(sum(inv) / len(inv)))
    return out


def test_log_expected_inverse_cost_by_hand():
    delta = torch.tensor([[0], [1], [2]])
    got = _log_expected_inverse_cost(COSTS.log(), delta, EPS).squeeze(-1)
    assert got.tolist() == pytest.approx(_by_hand(COSTS, [0, 1, 2], EPS), rel=1e-12)
    # point 0, delta 0: samples cost 4, 6, 3, 6 -> E[1/C] = (1/4 + 1/6 + 1/3 + 1/6) / 4
    assert math.exp(float(got[0])) == pytest.approx((1 / 4 + 1 / 6 + 1 / 3 + 1 / 6) / 4)


def test_cost_plugin_with_mock_samples_and_cached_prefixes():
    # d = 2: stage 0 owns dim 0, stage 1 dim 1, stage 2 has no dimension.
    prefix_dims = [[], [0], [0, 1], [0, 1]]
    cached = CachedPrefixes(
        {1: torch.tensor([[0.3]], dtype=D), 2: torch.tensor([[0.7, 0.7]], dtype=D)}, prefix_dims
    )
    X = torch.tensor([[[0.5, 0.5]], [[0.3, 0.1]], [[0.7, 0.7]]], dtype=D)
    assert cached.depth(X).squeeze(-1).tolist() == [0, 1, 2]
    plugin = LogExpectedInverseCost(
        _cost_model(),
        load_costs=EPS,
        cached=cached,
        sampler=StochasticSampler(sample_shape=torch.Size([4])),
    )
    assert plugin(X).tolist() == pytest.approx(_by_hand(COSTS, [0, 1, 2], EPS), rel=1e-12)


def test_marginal_path_matches_the_lognormal_closed_form():
    # One cost output, log C ~ N(mu, s^2): E[1/C] = exp(-mu + s^2 / 2).
    # Kind (a), deterministic: the QMC base samples are scrambled Sobol with a fixed
    # seed (the same on every machine); the error is 4e-4 at most against 2e-3.
    mu = torch.tensor([0.0, 1.0, -2.0], dtype=D).reshape(3, 1, 1)
    var = torch.tensor([0.25, 0.01, 1.0], dtype=D).reshape(3, 1, 1)
    plugin = LogExpectedInverseCost(
        MockModel(MockPosterior(mean=mu, variance=var)), mc_samples=4096
    )
    got = plugin(torch.zeros(3, 1, 2, dtype=D))
    expected = (-mu + var / 2).reshape(-1)
    assert torch.allclose(got, expected, atol=2e-3)


def test_deterministic_costs_give_exact_inverse_cost():
    log_c = torch.tensor([[1.0, 2.0, 3.0]], dtype=D).log().reshape(1, 1, 3)
    model = MockModel(MockPosterior(mean=log_c, variance=torch.zeros_like(log_c)))
    cached = CachedPrefixes({2: torch.tensor([[0.4, 0.6]], dtype=D)}, [[], [0], [0, 1]])
    plugin = LogExpectedInverseCost(model, load_costs=EPS, cached=cached, mc_samples=64)
    fresh = plugin(torch.tensor([[[0.1, 0.1]]], dtype=D))
    reuse = plugin(torch.tensor([[[0.4, 0.6]]], dtype=D))
    assert float(fresh) == pytest.approx(-math.log(6.0), abs=1e-6)
    assert float(reuse) == pytest.approx(-math.log(0.25 + 3.0), abs=1e-6)


def test_an_overhead_is_added_to_every_candidate_s_cost():
    log_c = torch.tensor([[1.0, 2.0, 3.0]], dtype=D).log().reshape(1, 1, 3)
    model = MockModel(MockPosterior(mean=log_c, variance=torch.zeros_like(log_c)))
    cached = CachedPrefixes({2: torch.tensor([[0.4, 0.6]], dtype=D)}, [[], [0], [0, 1]])
    X = torch.tensor([[[0.1, 0.1]], [[0.4, 0.6]]], dtype=D)  # fresh (cost 6), reuse (3.25)
    plain = LogExpectedInverseCost(model, load_costs=EPS, cached=cached, mc_samples=64)
    padded = LogExpectedInverseCost(
        model, load_costs=EPS, cached=cached, mc_samples=64, overhead=1.5
    )
    got = [float(v) for v in torch.cat([padded(X[:1]), padded(X[1:])])]
    assert got == pytest.approx([-math.log(7.5), -math.log(4.75)], abs=1e-6)
    # The overhead narrows what reuse is worth without removing it.
    gain = float(plain(X[1:]) - plain(X[:1]))
    assert 0 < got[1] - got[0] < gain
    with pytest.raises(ValueError, match="overhead"):
        LogExpectedInverseCost(model, overhead=-1.0)


def test_eeipu_with_eta_zero_is_exactly_log_ei():
    X = torch.rand(3, 1, 2, dtype=D)
    log_ei = LogExpectedImprovement(_objective(), best_f=0.5)(X)
    eeipu = LogEEIPU(
        _objective(),
        0.5,
        _cost_model(),
        EPS,
        None,
        eta=0.0,
        sampler=StochasticSampler(sample_shape=torch.Size([4])),
    )
    assert torch.equal(eeipu(X), log_ei)


@pytest.mark.parametrize("eta", [0.25, 1.0])
def test_eeipu_is_log_ei_plus_eta_log_expected_inverse_cost(eta):
    prefix_dims = [[], [0], [0, 1], [0, 1]]
    cached = CachedPrefixes({1: torch.tensor([[0.3]], dtype=D)}, prefix_dims)
    X = torch.tensor([[[0.5, 0.5]], [[0.3, 0.1]], [[0.9, 0.2]]], dtype=D)
    eeipu = LogEEIPU(
        _objective(),
        0.5,
        _cost_model(),
        EPS,
        cached,
        eta=eta,
        sampler=StochasticSampler(sample_shape=torch.Size([4])),
    )
    log_ei = LogExpectedImprovement(_objective(), best_f=0.5)(X)
    expected = log_ei + eta * torch.tensor(_by_hand(COSTS, [0, 1, 0], EPS), dtype=D)
    assert torch.allclose(eeipu(X), expected, rtol=1e-12)


def test_eips_and_carbo_use_a_total_cost():
    total = COSTS.sum(-1, keepdim=True)  # 4 x 3 x 1 x 1
    X = torch.rand(3, 1, 2, dtype=D)
    log_ei = LogExpectedImprovement(_objective(), best_f=0.0)(X)
    by_hand = torch.tensor(_by_hand(total, [0, 0, 0], torch.zeros(1, dtype=D)), dtype=D)
    sampler = StochasticSampler(sample_shape=torch.Size([4]))
    eips = LogEIPS(_objective(), 0.0, _cost_model(total), sampler=sampler)
    assert torch.allclose(eips(X), log_ei + by_hand)
    carbo = LogCArBO(_objective(), 0.0, _cost_model(total), eta=0.5, sampler=sampler)
    assert torch.allclose(carbo(X), log_ei + 0.5 * by_hand)


def test_cheaper_candidate_wins_at_equal_ei():
    # Same EI everywhere; a cached prefix saves the expensive first stage.
    log_c = torch.tensor([5.0, 1.0, 1.0], dtype=D).log().reshape(1, 1, 3).expand(2, 1, 3)
    costs = MockModel(MockPosterior(mean=log_c, variance=torch.zeros_like(log_c)))
    obj = MockModel(
        MockPosterior(mean=torch.zeros(2, 1, 1, dtype=D), variance=torch.ones(2, 1, 1, dtype=D))
    )
    cached = CachedPrefixes({1: torch.tensor([[0.2]], dtype=D)}, [[], [0], [0, 1], [0, 1]])
    acqf = LogEEIPU(obj, 0.0, costs, EPS, cached, eta=1.0, mc_samples=16)
    vals = acqf(torch.tensor([[[0.2, 0.9]], [[0.8, 0.9]]], dtype=D))
    assert float(vals[0] - vals[1]) == pytest.approx(math.log(7.0 / 2.5), abs=1e-6)


def test_cached_prefixes_deepest_match_and_snap():
    prefix_dims = [[], [0], [0, 1]]

    def snap(X):  # dim 0 is a 4-cell grid
        X = X.clone()
        X[..., 0] = ((X[..., 0] * 4).floor().clamp(0, 3) + 0.5) / 4
        return X

    cached = CachedPrefixes(
        {1: torch.tensor([[0.125], [0.625]], dtype=D), 2: torch.tensor([[0.625, 0.3]], dtype=D)},
        prefix_dims,
        snap=snap,
    )
    X = torch.tensor([[0.1, 0.9], [0.55, 0.3], [0.6, 0.31], [0.3, 0.3]], dtype=D)
    assert cached.depth(X).tolist() == [1, 2, 1, 0]
    assert not CachedPrefixes({}, prefix_dims)
    assert CachedPrefixes({}, prefix_dims).depth(X).tolist() == [0, 0, 0, 0]


def test_q_must_be_one():
    plugin = LogExpectedInverseCost(_cost_model(), sampler=StochasticSampler(torch.Size([4])))
    with pytest.raises(UnsupportedError, match="q must be 1"):
        plugin(torch.rand(3, 2, 2, dtype=D))


def test_invalid_construction():
    with pytest.raises(ValueError, match="eta"):
        CostAwareLogEI(_objective(), 0.0, cost=None, eta=1.5)
    with pytest.raises(ValueError, match="cost plug-in"):
        CostAwareLogEI(_objective(), 0.0, cost=None, eta=0.5)
    with pytest.raises(ValueError, match="load_costs"):
        LogExpectedInverseCost(_cost_model(), load_costs=torch.zeros(2, dtype=D))




def test_random_proposer_is_reproducible_per_index():
    a, b = RandomProposer(4, seed=3), RandomProposer(4, seed=3)
    assert torch.equal(a.propose(7), b.propose(7))
    assert not torch.equal(a.propose(7), a.propose(8))
    assert ((a.propose(0) >= 0) & (a.propose(0) <= 1)).all()
