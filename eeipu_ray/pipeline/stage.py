"""Pipeline stages and the context a stage function receives."""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eeipu_ray.errors import PipelineDefinitionError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

StageFn = Callable[..., Any]
"""``fn(inputs, params, ctx) -> output`` (``ctx`` may be left out of the signature)."""


@dataclass
class StageContext:
    """What a stage function gets besides its input and hyperparameters.

    Attributes:
        stage: Name of the running stage.
        index: 1-based position of the stage in its pipeline.
        trial_dir: A directory the stage may write scratch files into. Files a
            stage wants kept across trials must be part of its *output* (return a
            ``pathlib.Path``), not left here.
        device: ``"cpu"`` or a CUDA device string (``"cuda:0"``) chosen for the trial.
        params: Hyperparameters of every stage up to and including this one,
            ``{stage_name: {key: value}}``.
    """

    stage: str
    index: int
    trial_dir: Path
    device: str = "cpu"
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    _reporter: Callable[[dict[str, Any]], None] | None = None
    _charged: float | None = None

    def report(self, **metrics: Any) -> None:
        """Report progress (epoch, loss, ...). Under Ray Tune this becomes an
        intermediate ``tune.report`` when it contains the trial's metric."""
        if self._reporter is not None:
            self._reporter({"stage": self.stage, **metrics})
        else:
            logger.debug("stage %s progress: %s", self.stage, metrics)

    def charge(self, cost: float) -> None:
        """Declare this stage's cost instead of the wall clock (simulated pipelines).

        The declared cost replaces the measured compute seconds in the trial's
        record and in what the cache remembers as the stage's compute cost.
        """
        cost = float(cost)
        if not (math.isfinite(cost) and cost >= 0.0):
            raise ValueError(
                f"stage {self.stage!r} charged a cost of {cost!r}; costs must be finite and >= 0"
            )
        self._charged = cost


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline.

    Args:
        name: Unique within the pipeline; letters, digits, ``_ . -``.
        fn: ``fn(inputs, params, ctx)``: ``inputs`` is the previous stage's output
            (``None`` for the first stage), ``params`` this stage's
            hyperparameters, ``ctx`` a :class:`StageContext`. A two-argument
            ``fn(inputs, params)`` is accepted too.
        space: This stage's search space: Ray Tune domains (``tune.uniform``,
            ``loguniform``, ``quniform``, ``randint``, ``qrandint``, ``choice``)
            or constants.
        version: Bump it when the stage's code changes: cached outputs of the old
            version (and of every later stage) are then no longer reused.
        cost: Optional ``cost(params) -> float`` declaring the stage's compute cost
            instead of the clock (simulated pipelines). ``ctx.charge`` overrides it.
        load_cost: Optional declared cost of loading this stage's cached output,
            charged for every memoized stage instead of the measured load time.

    Example:
        >>> from ray import tune
        >>> prep = Stage("prep", lambda _, p: list(range(p["n"])), {"n": tune.randint(10, 100)})
    """

    name: str
    fn: StageFn
    space: Mapping[str, Any] = field(default_factory=dict)
    version: str = "1"
    cost: Callable[[Mapping[str, Any]], float] | None = None
    load_cost: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise PipelineDefinitionError(
                f"stage name {self.name!r} is invalid: use letters, digits, '_', '.', '-', "
                "starting with a letter or '_'"
            )
        if not callable(self.fn):
            raise PipelineDefinitionError(f"stage {self.name!r}: fn {self.fn!r} is not callable")
        if not isinstance(self.version, str) or not self.version:
            raise PipelineDefinitionError(
                f"stage {self.name!r}: version {self.version!r} must be a non-empty string"
            )
        if not isinstance(self.space, Mapping):
            raise PipelineDefinitionError(
                f"stage {self.name!r}: space must be a mapping of hyperparameter name to "
                f"domain, got {type(self.space).__name__}"
            )
        for key in self.space:
            if not isinstance(key, str) or not _NAME_RE.fullmatch(key):
                raise PipelineDefinitionError(
                    f"stage {self.name!r}: hyperparameter name {key!r} is invalid: use "
                    "letters, digits, '_', '.', '-'"
                )
        if self.cost is not None and not callable(self.cost):
            raise PipelineDefinitionError(
                f"stage {self.name!r}: cost {self.cost!r} must be a callable cost(params) -> "
                "float, or None"
            )
        if self.load_cost is not None and not _is_finite_nonnegative(self.load_cost):
            raise PipelineDefinitionError(
                f"stage {self.name!r}: load_cost {self.load_cost!r} must be a finite number >= 0"
            )
        object.__setattr__(self, "space", dict(self.space))
        object.__setattr__(self, "_wants_ctx", _accepts_three_args(self.name, self.fn))

    def call(self, inputs: Any, params: Mapping[str, Any], ctx: StageContext) -> Any:
        """Run the stage function with the arguments it accepts."""
        if self._wants_ctx:  # type: ignore[attr-defined]
            return self.fn(inputs, dict(params), ctx)
        return self.fn(inputs, dict(params))


def _is_finite_nonnegative(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number >= 0.0


def _accepts_three_args(stage_name: str, fn: StageFn) -> bool:
    """Whether ``fn`` is called as ``fn(inputs, params, ctx)`` (else ``fn(inputs, params)``).

    Raises:
        PipelineDefinitionError: naming the stage when ``fn`` can be called
            neither way (too few or too many required arguments).
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: pass ctx
        return True
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    keyword_only_required = [
        p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    # A call with n positional arguments binds iff required <= n <= accepted.
    accepted = math.inf if varargs else len(positional)
    if not keyword_only_required:
        if len(required) <= 3 <= accepted:
            return True
        if len(required) <= 2 <= accepted:
            return False
    raise PipelineDefinitionError(
        f"stage {stage_name!r}: function {getattr(fn, '__name__', fn)!r} must accept "
        f"(inputs, params, ctx) or (inputs, params); its signature is {sig}"
    )
