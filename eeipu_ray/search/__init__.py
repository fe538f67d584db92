"""The Ray-free BO engine: search-space encoder, GP models, acquisitions (EEIPU,
EI, EIPS, CArBO), the prefix-pool optimizer and the engine itself.

Heavy imports (torch, BoTorch) happen when this package is imported, not when
``eeipu_ray`` is; Ray is imported only lazily, to recognize domains.
"""

from __future__ import annotations

from eeipu_ray.search.acquisition import (
    CachedPrefixes,
    CostAwareLogEI,
    LogCArBO,
    LogEEIPU,
    LogEIPS,
    LogExpectedInverseCost,
    RandomProposer,
    cost_cooling,
)
from eeipu_ray.search.decisions import Decision, Proposal
from eeipu_ray.search.engine import ACQUISITIONS, STATE_FORMAT, BOEngine
from eeipu_ray.search.errors import (
    AcquisitionError,
    AcquisitionWarning,
    EngineOptionsError,
    EngineStateError,
    ModelFitWarning,
    SearchSpaceError,
    TrialResultError,
    TrialStateError,
)
from eeipu_ray.search.models import (
    CubeCategoricalKernel,
    FitOptions,
    GPFitter,
    LoadCostModel,
    MarginalGP,
    MarginalPosterior,
    SurrogateModels,
    fit_surrogates,
    make_kernel,
)
from eeipu_ray.search.optimize import (
    Candidate,
    OptimizeOptions,
    Prefix,
    build_prefix_pool,
)
from eeipu_ray.search.options import COSTS, EngineOptions
from eeipu_ray.search.records import TrialRecord, TrialStatus, TrialStore
from eeipu_ray.search.space import Dimension, SearchSpace

__all__ = [
    "ACQUISITIONS",
    "COSTS",
    "STATE_FORMAT",
    "AcquisitionError",
    "AcquisitionWarning",
    "BOEngine",
    "CachedPrefixes",
    "Candidate",
    "CostAwareLogEI",
    "CubeCategoricalKernel",
    "Decision",
    "Dimension",
    "EngineOptions",
    "EngineOptionsError",
    "EngineStateError",
    "FitOptions",
    "GPFitter",
    "LoadCostModel",
    "LogCArBO",
    "LogEEIPU",
    "LogEIPS",
    "LogExpectedInverseCost",
    "MarginalGP",
    "MarginalPosterior",
    "ModelFitWarning",
    "OptimizeOptions",
    "Prefix",
    "Proposal",
    "RandomProposer",
    "SearchSpace",
    "SearchSpaceError",
    "SurrogateModels",
    "TrialRecord",
    "TrialResultError",
    "TrialStateError",
    "TrialStatus",
    "TrialStore",
    "build_prefix_pool",
    "cost_cooling",
    "fit_surrogates",
    "make_kernel",
]
