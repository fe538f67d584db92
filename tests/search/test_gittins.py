"""The memoization-aware Gittins index (``eeipu_gittins``)."""

from __future__ import annotations

import math

import pytest
import torch
from botorch.acquisition.analytic import _log_ei_helper

from eeipu_ray.search.acquisition import CachedPrefixes
from eeipu_ray.search.models import GPFitter, MarginalGP
from eeipu_ray.search.strategies.gittins import MemoGittinsIndex, gittins_u
from tests.search.test_engine import observed_engine

D = torch.double


def test_gittins_u_solves_its_equation_with_implicit_gradients():
    log_ratio = torch.linspace(-30.0, 6.0, 37, dtype=D, requires_grad=True)
    u = gittins_u(log_ratio)
    # h(u) = phi(u) - u (1 - Phi(u)) = the standard normal's EI over u
    assert torch.allclose(_log_ei_helper(-u), log_ratio, atol=1e-9)
    assert bool((u[1:] < u[:-1]).all())  # a larger ratio: a lower threshold
    (grad,) = torch.autograd.grad(u.sum(), log_ratio)
    eps = 1e-5
    numeric = (gittins_u(log_ratio.detach() + eps) - gittins_u(log_ratio.detach() - eps)) / (
        2 * eps
    )
    assert torch.allclose(grad, numeric, rtol=1e-4, atol=1e-8)


def _models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(12, 2, generator=g, dtype=D)
    y = -((X - 0.4) ** 2).sum(-1, keepdim=True) * 30.0
    fitter = GPFitter([0, 0])
    objective = MarginalGP(fitter.fit("objective", X, y))
    # Stage 1 costs ~e^(2 x0) (0..7.4), stage 2 ~e^(x1) (1..2.7): log costs exact.
    costs = [
        MarginalGP(fitter.fit("c0", X, 2 * X[:, :1], active_dims=[0])),
        MarginalGP(fitter.fit("c1", X, X[:, 1:], active_dims=[0, 1])),
    ]
    from botorch.models.model import ModelList

    return objective, ModelList(*costs)


def test_the_index_is_the_threshold_whose_improvement_pays_for_the_cost():
    objective, costs = _models()
    load = torch.tensor([0.0, 0.05], dtype=D)
    lam, eta = 0.1, 1.0
    acqf = MemoGittinsIndex(objective, costs, load, None, eta=eta, lam=lam,
                            y_scale=float(objective.y_scale))
    X = torch.rand(6, 1, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    g = acqf(X) * float(objective.y_scale)  # back to the objective's units
    post = objective.posterior(X)
    mu, sigma = post.mean.reshape(-1), post.variance.sqrt().reshape(-1)
    z = (mu - g) / sigma
    normal = torch.distributions.Normal(0.0, 1.0)
    ei = sigma * (torch.exp(normal.log_prob(z)) + z * normal.cdf(z))
    cost = acqf.cost(X)
    assert torch.allclose(ei, lam * cost / acqf.c_ref * float(objective.y_scale), rtol=1e-6)


def test_a_cached_prefix_raises_the_index_and_cooling_removes_the_cost():
    objective, costs = _models()
    load = torch.tensor([0.0, 0.05], dtype=D)
    x = torch.tensor([[[0.9, 0.3]]], dtype=D)  # stage 1 is the costly one here
    cached = CachedPrefixes({1: torch.tensor([[0.9]], dtype=D)}, [[], [0], [0, 1]])
    scale = float(objective.y_scale)
    plain = MemoGittinsIndex(objective, costs, load, None, eta=1.0, y_scale=scale)
    memo = MemoGittinsIndex(objective, costs, load, cached, eta=1.0, y_scale=scale)
    with torch.no_grad():
        assert float(memo.cost(x)) < float(plain.cost(x)) / 3
    assert float(memo(x)) > float(plain(x))
    cold = [MemoGittinsIndex(objective, costs, load, c, eta=0.0, y_scale=scale) for c in
            (None, cached)]
    assert float(cold[0](x)) == pytest.approx(float(cold[1](x)))


def test_bad_arguments_are_refused():
    objective, costs = _models()
    load = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="eta"):
        MemoGittinsIndex(objective, costs, load, None, eta=1.5)
    with pytest.raises(ValueError, match="lam"):
        MemoGittinsIndex(objective, costs, load, None, eta=0.5, lam=0.0)


def test_the_engine_runs_bo_steps_with_it_and_reuses_prefixes():
    engine = observed_engine(7, acquisition="eeipu_gittins", budget=10_000.0)
    decisions = [d for d in engine.decisions if d.phase == "bo"]
    assert len(decisions) == 4
    assert all(math.isfinite(d.acquisition_value) for d in decisions)
    # At least one BO step extends a cached prefix of an earlier trial.
    assert any(d.planned_prefix_depth > 0 and d.source_trial for d in decisions)
