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


class EngineStateError(EEIPUError, ValueError):
    """A checkpoint given to ``load_state_dict`` is of another format or another
    search space."""


class ModelFitWarning(EEIPUWarning):
    """A GP could not be fitted numerically; the engine used a fallback
    (the previous or the prior hyperparameters) and goes on."""
