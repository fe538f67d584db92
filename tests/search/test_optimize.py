"""The prefix pool and the batched acquisition optimizer."""

from __future__ import annotations

import pytest
import torch
from botorch.acquisition import AcquisitionFunction
from botorch.utils.testing import MockModel, MockPosterior

from eeipu_ray.search.optimize import (
    EMPTY_PREFIX,
    OptimizeOptions,
    Prefix,
    _PoolAcquisition,
    build_prefix_pool,
    rank_over_pool,
)

D = torch.double
# d = 4: stage 0 owns dims 0-1, stage 1 dim 2, stage 2 dim 3.
PREFIX_DIMS = [[], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


class _Bowl(AcquisitionFunction):
    """``-||x - target||^2`` plus ``bonus`` where dims 0-1 equal ``cached`` exactly
    (a stand-in for a cheaper, cached prefix)."""

    def __init__(self, target, cached=None, bonus=0.0):
        super().__init__(model=MockModel(MockPosterior(mean=torch.zeros(1, 1, 1, dtype=D))))
        self.target = torch.tensor(target, dtype=D)
        self.cached = None if cached is None else torch.tensor(cached, dtype=D)
        self.bonus = bonus

    def forward(self, X):
        x = X.squeeze(-2)
        value = -((x - self.target) ** 2).sum(-1)
        if self.cached is not None:
            hit = ((x[..., :2] - self.cached).abs() < 1e-12).all(-1)
            value = value + self.bonus * hit.to(D)
        return value


def test_pool_holds_empty_prefix_and_available_proper_prefixes():
    top = [
        ("a", torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D), ["ka1", "ka2", "ka3"]),
        ("b", torch.tensor([0.1, 0.2, 0.9, 0.9], dtype=D), ["ka1", "kb2", "kb3"]),  # shares stage 1
        ("c", torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=D), ["kc1", "kc2", "kc3"]),
    ]
    gone = {"kc2"}
    pool = build_prefix_pool(top, 3, PREFIX_DIMS, lambda tid, depth, key: key not in gone)
    assert pool[0] is EMPTY_PREFIX
    got = [(p.source_trial, p.depth, p.key) for p in pool[1:]]
    # no full-depth prefixes (k < K), "b"'s stage-1 prefix deduplicated, "kc2" evicted
    assert got == [("a", 1, "ka1"), ("a", 2, "ka2"), ("b", 2, "kb2"), ("c", 1, "kc1")]


def test_empty_prefix_finds_the_optimum():
    # Kind (a), by margin: an isotropic quadratic, which L-BFGS-B solves from any
    # start (measured: to the last bit for seeds 0-9) against tolerances of 1e-4.
    acqf = _Bowl([0.2, 0.7, 0.4, 0.9])
    cand = rank_over_pool(
        acqf,
        [EMPTY_PREFIX],
        PREFIX_DIMS,
        4,
        OptimizeOptions(num_restarts=3, raw_samples=64),
        seed=0,
    )[0]
    assert cand.prefix is EMPTY_PREFIX
    assert torch.allclose(cand.x, torch.tensor([0.2, 0.7, 0.4, 0.9], dtype=D), atol=1e-4)
    assert cand.value == pytest.approx(0.0, abs=1e-7)


def test_best_prefix_wins_and_keeps_its_values_exactly():
    # Kind (a), by margin: the "near" prefix is worth 0.67, every other candidate at
    # most 0; its free dimensions are again an isotropic quadratic.
    cached = [0.6123456789, 0.3]
    acqf = _Bowl([0.2, 0.7, 0.4, 0.9], cached=cached, bonus=1.0)
    pool = [
        EMPTY_PREFIX,
        Prefix(1, torch.tensor([0.9, 0.9, 0.1, 0.1], dtype=D), "far", "k-far"),
        Prefix(1, torch.tensor([*cached, 0.0, 0.0], dtype=D), "near", "k-near"),
        Prefix(2, torch.tensor([0.95, 0.05, 0.5, 0.0], dtype=D), "deep", "k-deep"),
    ]
    cand = rank_over_pool(
        acqf, pool, PREFIX_DIMS, 4, OptimizeOptions(num_restarts=3, raw_samples=64), seed=1
    )[0]
    assert cand.prefix.source_trial == "near"
    assert cand.x[:2].tolist() == cached  # bit-exact: no drift of fixed dims
    assert torch.allclose(cand.x[2:], torch.tensor([0.4, 0.9], dtype=D), atol=1e-4)
    expected = (
        1.0 - ((torch.tensor(cached, dtype=D) - torch.tensor([0.2, 0.7], dtype=D)) ** 2).sum()
    )
    assert cand.value == pytest.approx(float(expected), abs=1e-7)


def test_pool_acquisition_fixes_each_row_to_its_own_prefix():
    seen = {}

    class Spy(_Bowl):
        def forward(self, X):
            seen["X"] = X.detach().clone()
            return super().forward(X)

    fixed = torch.tensor([[False] * 4, [True, True, False, False], [True, True, True, False]])
    template = torch.tensor([[0.0] * 4, [0.1, 0.2, 0.0, 0.0], [0.3, 0.4, 0.5, 0.0]], dtype=D)
    wrapped = _PoolAcquisition(Spy([0.5] * 4), fixed, template)
    X = torch.tensor(
        [[[0.9, 0.9, 0.9, 0.9, 2.0]], [[0.9, 0.9, 0.9, 0.9, 0.0]], [[0.9, 0.9, 0.9, 0.9, 1.0]]],
        dtype=D,
    )
    wrapped(X)
    assert seen["X"].squeeze(-2).tolist() == [
        [0.3, 0.4, 0.5, 0.9],
        [0.9, 0.9, 0.9, 0.9],
        [0.1, 0.2, 0.9, 0.9],
    ]


def test_options_validated():
    with pytest.raises(ValueError, match="num_restarts"):
        OptimizeOptions(num_restarts=0)
    with pytest.raises(ValueError, match="pool is empty"):
        rank_over_pool(_Bowl([0.5] * 4), [], PREFIX_DIMS, 4)
