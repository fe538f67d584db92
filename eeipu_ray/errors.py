"""Exception and warning types of eeipu-ray.

Every error the project raises on purpose derives from :class:`EEIPUError`, so a
caller can tell "the library refused this input" from "something crashed". The
messages name the culprit (stage, key, value) and say what to do.
"""

from __future__ import annotations

from typing import Any


class EEIPUError(Exception):
    """Base class of every error raised on purpose by eeipu-ray."""


class PipelineDefinitionError(EEIPUError, ValueError):
    """A pipeline or stage was declared wrongly (names, search space, versions)."""


class ConfigError(EEIPUError, ValueError):
    """A configuration given to a pipeline does not fit its search space."""


class PrefixKeyError(EEIPUError, ValueError):
    """A hyperparameter value cannot be turned into a deterministic prefix key."""


class CacheError(EEIPUError):
    """The prefix cache could not complete an operation."""


class CacheConfigError(CacheError, ValueError):
    """A cache URL or cache option is invalid."""


class CacheStorageError(CacheError, OSError):
    """The storage behind the cache refused an operation (a read-only or missing
    directory, a bucket that does not exist, no permission, ...). It is an
    :class:`OSError` too, so callers that catch ``OSError`` keep working."""


class CodecError(CacheError, TypeError):
    """A stage output has no codec, or a codec cannot encode/decode a value."""


class CacheIntegrityError(CacheError):
    """A cache entry is partial, corrupted or does not match its key.

    Readers never raise this to a stage: such an entry is a miss. It is raised
    only by explicit verification calls (``PrefixCache.verify``).
    """


class StageExecutionError(EEIPUError, RuntimeError):
    """A stage function raised; the message names the stage and its hyperparameters.

    Attributes:
        spent: What the trial spent before it failed, in the result schema of
            ``PipelineRun.to_result`` (``stage_costs/<s>`` of the stages it
            loaded or ran, the failing one included, ``total_cost``,
            ``memoized_stages``, ...; no metric); empty when unknown. The
            trainable reports it, so a failed trial is charged what it spent.
    """

    def __init__(self, message: str, spent: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.spent: dict[str, Any] = dict(spent or {})


class EnergyMeterError(EEIPUError, RuntimeError):
    """Energy was required (energy as the cost, a scheduler ranking by joules) but no
    energy meter is available, or a meter could not be opened or read. The message
    says which meters were tried and why each is unavailable."""


class EEIPUWarning(UserWarning):
    """Base class of eeipu-ray warnings."""
