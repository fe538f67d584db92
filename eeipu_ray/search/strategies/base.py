"""What every acquisition strategy answers, and the registry the engine looks them up in.

A strategy is one acquisition method as the engine sees it: which surrogate
models a BO step must fit for it, whether it reuses cached prefixes (the
prefix pool and ``delta(x)``), its cost exponent ``eta`` and how its BoTorch
acquisition function is built. :class:`~eeipu_ray.search.BOEngine` asks the
strategy named by ``EngineOptions.acquisition`` and switches on nothing else.

Adding a method is one module: subclass :class:`AcquisitionStrategy`, set its
class attributes, implement :meth:`~AcquisitionStrategy.build` (and
:meth:`~AcquisitionStrategy.eta` when it is cost-aware), and decorate it with
:func:`register`. Importing the module makes ``EngineOptions(acquisition=name)``
valid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from botorch.models.model import ModelList
from torch import Tensor

from eeipu_ray.search.acquisition import CachedPrefixes, CostAwareLogEI, cost_cooling
from eeipu_ray.search.errors import EngineOptionsError
from eeipu_ray.search.models import MarginalGP, SurrogateModels

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class CostModels:
    """The cost models of one BO step, shared by every acquisition of a batch.

    Attributes:
        stage_costs: Fast marginals of the ``K`` stage log-cost GPs (one output
            per stage), when the strategy needs them.
        load_costs: ``Tensor[K]``: the cost of loading ``delta`` cached stages.
        total_cost: Fast marginal of the total log-cost GP, when needed.
    """

    stage_costs: ModelList | None
    load_costs: Tensor
    total_cost: MarginalGP | None


@dataclass(frozen=True)
class AcquisitionInputs:
    """Everything a strategy builds its acquisition function from.

    Attributes:
        objective: The objective GP conditioned on the pending trials (kriging
            believer), as a fast marginal.
        best_f: The incumbent (at least the believer's).
        costs: The step's cost models.
        cached: The prefixes that are cached or about to be; ``None`` unless
            the strategy is memoization-aware.
        eta: The cost exponent of the step (:meth:`AcquisitionStrategy.eta`).
        mc_samples: QMC samples of the cost posterior.
        cost_overhead: Fixed cost of every candidate, as a fraction of a
            typical whole run (:func:`typical_run_cost`), for the
            memoization-aware strategies (``EngineOptions.cost_overhead``).
    """

    objective: MarginalGP
    best_f: float
    costs: CostModels
    cached: CachedPrefixes | None
    eta: float
    mc_samples: int
    cost_overhead: float = 0.0


def typical_run_cost(stage_costs: ModelList) -> float:
    """The cost of a typical whole run: the sum over stages of the geometric mean
    of their observed costs (each stage GP's mean log cost)."""
    shifts = [float(getattr(m, "y_shift", 0.0)) for m in stage_costs.models]
    return float(sum(math.exp(v) for v in shifts)) if shifts else 1.0


class AcquisitionStrategy:
    """One acquisition method, as the engine uses it.

    Class attributes:
        name: The value of ``EngineOptions.acquisition`` that selects it.
        proposes_randomly: Every suggestion is a uniform random point: no
            warm-up, no models, :meth:`build` is never called.
        needs_stage_costs: A BO step fits one log-cost GP per stage.
        needs_total_cost: A BO step fits one GP of the total log cost.
        memoization_aware: Candidates extend the prefixes of the top trials
            (the prefix pool), and the acquisition knows which prefixes are
            cached, so it charges only the uncached stages.
    """

    name: ClassVar[str] = ""
    proposes_randomly: ClassVar[bool] = False
    needs_stage_costs: ClassVar[bool] = False
    needs_total_cost: ClassVar[bool] = False
    memoization_aware: ClassVar[bool] = False

    def eta(self, budget: float | None, spent: float, spent_after_warmup: float | None) -> float:
        """The cost exponent in ``[0, 1]`` (0: the cost is ignored)."""
        return 0.0

    def cost_models(self, models: SurrogateModels) -> CostModels:
        """Fast marginals of the fitted cost models this strategy needs."""
        stage = total = None
        if self.needs_stage_costs:
            if models.stage_costs is None:
                raise RuntimeError(f"{self.name}: the stage-cost GPs were not fitted")
            stage = ModelList(*(MarginalGP(m) for m in models.stage_costs.models))
        if self.needs_total_cost:
            if models.total_cost is None:
                raise RuntimeError(f"{self.name}: the total-cost GP was not fitted")
            total = MarginalGP(models.total_cost)
        return CostModels(stage, models.load_costs, total)

    def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
        """The acquisition function (``q = 1``, maximized) of one BO step."""
        raise NotImplementedError(f"{type(self).__name__} does not build an acquisition")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CooledStrategy(AcquisitionStrategy):
    """A strategy whose cost exponent follows the budget's cost cooling
    (:func:`~eeipu_ray.search.acquisition.cost_cooling`)."""

    def eta(self, budget: float | None, spent: float, spent_after_warmup: float | None) -> float:
        return cost_cooling(budget, spent, spent_after_warmup)


_REGISTRY: dict[str, type[AcquisitionStrategy]] = {}


def register(cls: type[AcquisitionStrategy]) -> type[AcquisitionStrategy]:
    """Class decorator: make ``cls`` selectable as ``EngineOptions(acquisition=cls.name)``.

    Raises:
        ValueError: the name is not a lower-case identifier, or another class
            holds it already.
    """
    if not (isinstance(cls, type) and issubclass(cls, AcquisitionStrategy)):
        raise TypeError(f"{cls!r} is not an AcquisitionStrategy subclass")
    name = cls.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{cls.__name__}.name={name!r} must be a lower-case identifier ([a-z][a-z0-9_]*)"
        )
    held = _REGISTRY.get(name)
    if held is not None and held is not cls:
        raise ValueError(f"acquisition {name!r} is already registered by {held.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def acquisition_names() -> tuple[str, ...]:
    """Every registered acquisition name, in registration order."""
    return tuple(_REGISTRY)


def get_strategy(name: str) -> AcquisitionStrategy:
    """A new instance of the strategy registered under ``name``.

    Raises:
        EngineOptionsError: no strategy has that name.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise EngineOptionsError(f"acquisition={name!r} is not one of {acquisition_names()}")
    return cls()
