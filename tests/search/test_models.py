"""GP models: kernels, warm start, fallback, fast marginals, load-cost model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from botorch.exceptions.errors import ModelFittingError
from botorch.models.transforms.outcome import Standardize
from gpytorch.kernels import MaternKernel, ProductKernel

import eeipu_ray.search.models as models_module
from eeipu_ray.search.errors import ModelFitWarning
from eeipu_ray.search.models import (
    CubeCategoricalKernel,
    FitOptions,
    GPFitter,
    LoadCostModel,
    MarginalGP,
    fit_surrogates,
    make_kernel,
    warp_objective,
)
from eeipu_ray.search.records import TrialRecord, TrialStatus

D = torch.double


def _data(n=20, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=torch.double)
    Y = (torch.sin(6 * X[:, :1]) + X[:, 1:2] ** 2) * 5 + 100  # far from standardized
    return X, Y


def test_objective_gp_is_matern52_ard_on_the_cube_with_standardized_y():
    X, Y = _data()
    gp = GPFitter([0, 0, 0]).fit("objective", X, Y)
    kernel = gp.covar_module
    assert isinstance(kernel, MaternKernel) and kernel.nu == 2.5
    assert kernel.lengthscale.shape[-1] == 3  # ARD
    assert isinstance(gp.outcome_transform, Standardize)
    # the cube already spans the declared bounds: no input rescaling to the data
    assert getattr(gp, "input_transform", None) is None
    assert torch.equal(gp.train_inputs[0], X)


def test_make_kernel_categorical_and_active_dims():
    kernel = make_kernel([0, 1, 2], [0, 3, 0])
    assert isinstance(kernel, ProductKernel)
    matern, cat = kernel.kernels
    assert matern.active_dims.tolist() == [0, 2]
    assert isinstance(cat, CubeCategoricalKernel) and cat.active_dims.tolist() == [1]
    only_cont = make_kernel([0, 2], [0, 3, 0])
    assert isinstance(only_cont, MaternKernel) and only_cont.active_dims.tolist() == [0, 2]


def test_categorical_kernel_compares_cells():
    kernel = CubeCategoricalKernel([3])
    x = torch.tensor([[0.1], [0.2], [0.5], [0.9]], dtype=torch.double)  # cells 0, 0, 1, 2
    K = kernel(x).to_dense().detach()
    same = math.exp(0.0)
    diff = math.exp(-1.0 / float(kernel.lengthscale.detach()))
    expected = torch.tensor(
        [
            [same, same, diff, diff],
            [same, same, diff, diff],
            [diff, diff, same, diff],
            [diff, diff, diff, same],
        ],
        dtype=torch.double,
    )
    assert torch.allclose(K, expected)
    assert torch.allclose(kernel(x, diag=True).detach(), torch.ones(4, dtype=torch.double))


def test_warm_start_reuses_hyperparameters_and_refits_on_growth():
    X, Y = _data(n=30)
    fitter = GPFitter([0, 0, 0], FitOptions(refit_growth=0.5))
    first = fitter.fit("objective", X[:20], Y[:20])
    ls = first.covar_module.lengthscale.detach().clone()
    # 2 more points (< 50% growth): same hyperparameters, new data
    second = fitter.fit("objective", X[:22], Y[:22])
    assert torch.equal(second.covar_module.lengthscale.detach(), ls)
    assert second.train_inputs[0].shape[0] == 22
    # 30 points (>= 50% growth): re-optimized, starting from the previous values
    started = {}
    real_fit = models_module.fit_gpytorch_mll

    def spy(mll, **kwargs):
        started["ls"] = mll.model.covar_module.lengthscale.detach().clone()
        started["maxiter"] = kwargs["optimizer_kwargs"]["options"]["maxiter"]
        return real_fit(mll, **kwargs)

    models_module.fit_gpytorch_mll = spy
    try:
        third = fitter.fit("objective", X, Y)
    finally:
        models_module.fit_gpytorch_mll = real_fit
    assert torch.allclose(started["ls"], ls)
    assert started["maxiter"] == fitter.options.maxiter_warm
    assert third.train_inputs[0].shape[0] == 30


def test_numerical_failure_falls_back_with_a_warning(monkeypatch):
    X, Y = _data()

    def broken(*args, **kwargs):
        raise ModelFittingError("All attempts to fit the model have failed.")

    monkeypatch.setattr(models_module, "fit_gpytorch_mll", broken)
    with pytest.warns(ModelFitWarning, match="could not be fitted"):
        gp = GPFitter([0, 0, 0]).fit("objective", X, Y)
    assert not gp.training
    assert torch.isfinite(gp.posterior(X[:3]).mean).all()


def test_other_errors_are_not_swallowed(monkeypatch):
    X, Y = _data()

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a numerical problem")

    monkeypatch.setattr(models_module, "fit_gpytorch_mll", broken)
    with pytest.raises(TypeError, match="a bug"):
        GPFitter([0, 0, 0]).fit("objective", X, Y)


@pytest.mark.parametrize("categories", [[0, 0, 0], [0, 4, 0]], ids=["matern", "mixed"])
def test_marginal_gp_matches_botorch_posterior(categories):
    # Kind (b): two routes to the same posterior of the same fitted GP; measured
    # apart by ~1e-13 (the GP's noise floor bounds the conditioning), against 1e-8.
    X, Y = _data(n=25)
    gp = GPFitter(categories).fit("objective", X, Y)
    fast = MarginalGP(gp)
    Xq = torch.rand(40, 1, 3, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    ref = gp.posterior(Xq)
    got = fast.posterior(Xq)
    assert got.mean.shape == (40, 1, 1)
    assert torch.allclose(got.mean, ref.mean, atol=1e-8)
    assert torch.allclose(got.variance, ref.variance, rtol=1e-6, atol=1e-10)


def test_marginal_gp_believer_collapses_variance_at_pending_points():
    # Kind (b): identities of the kriging believer, whatever the fitted
    # hyperparameters (how far the variance falls depends on the fitted noise, so
    # no fixed ratio is asserted); the tolerances cover rounding (~1e-13) only.
    X, Y = _data(n=25)
    gp = GPFitter([0, 0, 0]).fit("objective", X, Y)
    Xp = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]], dtype=torch.double)
    before = MarginalGP(gp).posterior(Xp.unsqueeze(-2))
    after = MarginalGP(gp, X_pending=Xp).posterior(Xp.unsqueeze(-2))
    assert torch.allclose(after.mean, before.mean, atol=1e-6)  # the mean is believed
    # The variance is the posterior's after observing both points with the GP's own
    # noise: Sigma - Sigma (Sigma + noise I)^-1 Sigma (Sigma: their joint posterior).
    with torch.no_grad():
        joint = gp.posterior(Xp).covariance_matrix
        noise = gp.likelihood.noise.reshape(()) * gp.outcome_transform.stdvs.reshape(()) ** 2
    expected = joint - joint @ torch.linalg.solve(joint + noise * torch.eye(2, dtype=D), joint)
    assert torch.allclose(after.variance.reshape(-1), expected.diagonal(), rtol=1e-6)
    assert (after.variance < before.variance).all()
    # Believing the means leaves the mean unchanged everywhere (measured: ~4e-14).
    far = torch.tensor([[[0.5, 0.5, 0.95]]], dtype=torch.double)
    assert torch.allclose(
        MarginalGP(gp, X_pending=Xp).posterior(far).mean,
        MarginalGP(gp).posterior(far).mean,
        atol=1e-3,
    )


def test_marginal_gp_gradients_flow_to_x():
    X, Y = _data(n=25)
    fast = MarginalGP(GPFitter([0, 0, 0]).fit("objective", X, Y))
    Xq = torch.rand(5, 1, 3, dtype=torch.double, requires_grad=True)
    post = fast.posterior(Xq)
    (post.mean.sum() + post.variance.sum()).backward()
    assert Xq.grad is not None and torch.isfinite(Xq.grad).all()


def test_load_cost_model_prior_and_shrinkage():
    m = LoadCostModel(3, prior_per_stage=0.1)
    assert m.prefix_costs().tolist() == pytest.approx([0.0, 0.1, 0.2])
    m.observe(1, 0.4)
    m.observe(1, 1.6)
    # geometric mean with one pseudo-observation at the prior: (0.1 * 0.4 * 1.6)^(1/3)
    assert float(m.prefix_costs()[1]) == pytest.approx((0.1 * 0.4 * 1.6) ** (1 / 3))
    assert float(m.prefix_costs()[2]) == pytest.approx(0.2)
    m.observe(2, 0.0)  # a 0 s load is floored, not -inf
    assert math.isfinite(float(m.prefix_costs()[2]))
    with pytest.raises(ValueError, match="prior_per_stage"):
        LoadCostModel(2, prior_per_stage=0)


def _record(tid, x, obj, compute, spent=None, memoized=0, status=TrialStatus.COMPLETED):
    return TrialRecord(
        trial_id=tid,
        config={},
        x=torch.tensor(x, dtype=torch.double),
        status=status,
        objective=obj,
        compute_costs=list(compute),
        stage_costs=list(spent or compute),
        memoized_stages=memoized,
    )


def test_fit_surrogates_uses_the_right_records():
    stage_dims = [[0], [1]]
    records = [
        _record("a", [0.1, 0.2], 1.0, [2.0, 3.0]),
        _record("b", [0.5, 0.9], 2.0, [4.0, 1.0]),
        # loaded stage 1 from "a": its compute cost is a copy, counted once
        _record("c", [0.1, 0.7], 0.5, [2.0, 2.0], spent=[0.3, 2.0], memoized=1),
        _record("d", [0.8, 0.4], None, [1.0, None], status=TrialStatus.FAILED),
        _record("p", [0.3, 0.3], None, [], status=TrialStatus.PENDING),
    ]
    fitter = GPFitter([0, 0])
    models = fit_surrogates(
        fitter, records, stage_dims, need_stage_costs=True, need_total_cost=True
    )
    assert models.objective.train_inputs[0].shape[0] == 3  # a, b, c
    cost0, cost1 = models.stage_costs.models
    assert cost0.train_inputs[0].shape[0] == 3  # a, b, d (c's stage 1 is a's copy)
    assert cost1.train_inputs[0].shape[0] == 3  # a, b, c
    assert torch.allclose(
        cost0.outcome_transform.untransform(cost0.train_targets.unsqueeze(-1))[0].squeeze(-1),
        torch.tensor([math.log(2.0), math.log(4.0), math.log(1.0)], dtype=torch.double),
    )
    # upstream: stage 2's cost GP sees stages 1..2
    assert cost1.covar_module.active_dims.tolist() == [0, 1]
    assert cost0.covar_module.active_dims.tolist() == [0]
    assert models.total_cost.train_inputs[0].shape[0] == 3  # d lacks stage 2's cost
    assert models.load_costs.tolist() == pytest.approx([0.0, math.sqrt(0.1 * 0.3)])
    own = fit_surrogates(
        GPFitter([0, 0]),
        records,
        stage_dims,
        need_stage_costs=True,
        need_total_cost=False,
        upstream=False,
    )
    assert own.stage_costs.models[1].covar_module.active_dims.tolist() == [1]
    assert own.total_cost is None


def test_missing_cost_observations_warn_and_assume_unit_cost():
    # Kind (a), structural: one observation of log-cost 0 gives a mean of exactly 0.
    records = [_record("a", [0.1], 1.0, [None]), _record("b", [0.6], 2.0, [None])]
    with pytest.warns(ModelFitWarning, match="no cost observations"):
        models = fit_surrogates(
            GPFitter([0]), records, [[0]], need_stage_costs=True, need_total_cost=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = torch.rand(3, 1, 1, dtype=torch.double, generator=torch.Generator().manual_seed(0))
        mean = models.stage_costs.models[0].posterior(X).mean
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-6)


@pytest.mark.parametrize("warping", ["power", "copula"])
def test_warping_keeps_the_order_and_compresses_a_long_lower_tail(warping):
    g = torch.Generator().manual_seed(3)
    good = -torch.rand(30, 1, generator=g, dtype=D) * 3  # in [-3, 0]
    Y = torch.cat([good, torch.tensor([[-120.0], [-80.0]], dtype=D)])
    W = warp_objective(Y, warping)
    assert W.shape == Y.shape
    assert torch.equal(W.argsort(0), Y.argsort(0))  # monotone: the best stays the best
    # The share of the standardized range the good points span grows.
    def spread(v):
        s = (v - v.mean()) / v.std()
        return float(s[:30].max() - s[:30].min()) / float(s.max() - s.min())
    assert spread(W) > 2 * spread(Y)


def test_warping_near_the_float_limits_keeps_the_order_or_leaves_the_values():
    Y = torch.tensor([[1e308], [-1e308], [0.0], [1.0], [2.0]], dtype=D)
    for warping in ("power", "copula"):
        W = warp_objective(Y, warping)
        assert bool(torch.isfinite(W).all())
        assert torch.equal(W.argsort(0), Y.argsort(0)), warping


def test_warping_none_and_degenerate_inputs_are_the_identity():
    Y = torch.tensor([[1.0], [1.0], [2.0]], dtype=D)
    assert warp_objective(Y, "power") is Y  # two distinct values
    Z = torch.tensor([[1.0], [5.0], [2.0]], dtype=D)
    assert warp_objective(Z, "none") is Z
    with pytest.raises(ValueError, match="warping='log'"):
        warp_objective(Z, "log")


def test_fit_surrogates_warps_the_objective_and_its_incumbent():
    stage_dims = [[0], [1]]
    records = [
        _record(str(i), [0.1 * i, 0.05 * i], y, [1.0, 1.0])
        for i, y in enumerate([-200.0, -3.0, -2.0, -1.0, -0.5])
    ]
    plain = fit_surrogates(GPFitter([0, 0]), records, stage_dims,
                           need_stage_costs=False, need_total_cost=False)
    assert plain.best_f == -0.5
    warped = fit_surrogates(GPFitter([0, 0]), records, stage_dims, need_stage_costs=False,
                            need_total_cost=False, warping="copula")
    targets = warped.objective.outcome_transform.untransform(
        warped.objective.train_targets.unsqueeze(-1))[0].reshape(-1)
    assert warped.best_f == pytest.approx(float(targets.max()))
    assert int(targets.argmax()) == 4  # the best record is still the best


def test_stage_additive_kernel_is_the_joint_kernel_plus_one_per_stage():
    from gpytorch.kernels import AdditiveKernel, ScaleKernel

    groups = [[0, 1], [2], [3]]
    kernel = make_kernel([0, 1, 2, 3], [0, 0, 3, 0], groups)
    assert isinstance(kernel, AdditiveKernel) and len(kernel.kernels) == 4
    assert all(isinstance(k, ScaleKernel) for k in kernel.kernels)
    joint, *stages = (k.base_kernel for k in kernel.kernels)
    assert isinstance(joint, ProductKernel)  # the categorical dim 2 stays categorical
    assert stages[0].active_dims.tolist() == [0, 1]
    assert isinstance(stages[1], CubeCategoricalKernel) and stages[1].active_dims.tolist() == [2]
    assert stages[2].active_dims.tolist() == [3]
    g = torch.Generator().manual_seed(0)
    X = torch.rand(6, 4, generator=g, dtype=D)
    X[:, 2] = torch.tensor([0.1, 0.4, 0.9, 0.1, 0.6, 0.3], dtype=D)
    with torch.no_grad():
        K = kernel(X).to_dense()
        parts = sum(k(X).to_dense() for k in kernel.kernels)
        assert torch.allclose(K, parts)
        # Moving stage 3's dimension leaves every other stage's part unchanged.
        Y = X.clone()
        Y[:, 3] = 1.0 - Y[:, 3]
        for k in kernel.kernels[1:3]:
            assert torch.equal(k(X, Y).to_dense(), k(X, X).to_dense())
        last = kernel.kernels[3]
        assert not torch.allclose(last(X, Y).to_dense(), last(X).to_dense())
    # One stage only (or none): the plain kernel.
    assert isinstance(make_kernel([0, 1], [0, 0], [[0, 1]]), MaternKernel)


def test_fit_surrogates_stage_additive_kernel_and_its_fast_marginal():
    from gpytorch.kernels import AdditiveKernel

    X, Y = _data(n=24, d=3)
    records = [_record(f"t{i}", X[i].tolist(), float(Y[i]), [1.0, 1.0]) for i in range(24)]
    models = fit_surrogates(
        GPFitter([0, 0, 0]), records, [[0], [1, 2]], need_stage_costs=False,
        need_total_cost=False, kernel="stage_additive",
    )
    gp = models.objective
    assert isinstance(gp.covar_module, AdditiveKernel) and len(gp.covar_module.kernels) == 3
    Xq = torch.rand(10, 1, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    ref, got = gp.posterior(Xq), MarginalGP(gp).posterior(Xq)
    assert torch.allclose(got.mean, ref.mean, atol=1e-8)
    assert torch.allclose(got.variance, ref.variance, rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="kernel='sum' is not one of"):
        fit_surrogates(GPFitter([0, 0, 0]), records, [[0], [1, 2]], need_stage_costs=False,
                       need_total_cost=False, kernel="sum")
