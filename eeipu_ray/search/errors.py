"""Exception and warning types of the search engine.

All derive from :class:`eeipu_ray.errors.EEIPUError` (errors) or
:class:`eeipu_ray.errors.EEIPUWarning` (warnings), so a caller can catch
"the library refused this" in one place.
"""

from __future__ import annotations

from eeipu_ray.errors import EEIPUError, EEIPUWarning


class SearchSpaceError(EEIPUError, ValueError):
    """A search space cannot be encoded, or a config does not fit it.

    The message names the offending key as ``"stage/key"``.
    """


class EngineOptionsError(EEIPUError, ValueError):
    """An :class:`~eeipu_ray.search.engine.EngineOptions` field is invalid; the
    message names the option."""


class TrialStateError(EEIPUError, KeyError):
    """A trial id is unknown to the engine, or suggested twice."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class TrialResultError(EEIPUError, TypeError):
    """A result given to the engine is not a mapping of metric and cost keys; the
    message names the trial and what was given instead."""


class AcquisitionError(EEIPUError, ValueError):
    """The acquisition could not be optimized numerically: it is not finite at any
    raw sample or optimized candidate (objectives or costs of extreme magnitude).
    The engine catches it and proposes a random point, with an
    :class:`AcquisitionWarning`."""


class EngineStateError(EEIPUError, ValueError):
    """A checkpoint given to ``load_state_dict`` is of another format or another
    search space."""


class AcquisitionWarning(EEIPUWarning):
    """A BO step fell back: the acquisition was not finite anywhere (the engine
    proposed a random point) or its gradient was NaN (the best raw samples were
    used instead of L-BFGS-B's end points)."""


class ModelFitWarning(EEIPUWarning):
    """A GP could not be fitted numerically; the engine used a fallback
    (the previous or the prior hyperparameters) and goes on."""
