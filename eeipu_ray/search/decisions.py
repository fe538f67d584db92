"""What the engine decides: a :class:`Proposal` (a BO step's outcome before it
has a trial id) and a :class:`Decision` (one logged suggestion)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Proposal:
    """A BO step's outcome before it is given a trial id (see :meth:`BOEngine.lookahead`).

    Attributes:
        config: The proposed config.
        planned_depth: Leading stages it expects to load from the cache.
        source_trial: The trial whose cached prefix it extends, if any.
        version: The store version (completed results) it was computed at.
        eta: The cost exponent its acquisition used.
        acquisition_value: The winning candidate's (log) acquisition value;
            ``None`` when every candidate repeated a tried config and a random
            point was taken instead.
    """

    config: dict[str, Any]
    planned_depth: int
    source_trial: str | None
    version: int
    eta: float = 1.0
    acquisition_value: float | None = None


@dataclass(frozen=True)
class Decision:
    """One suggestion, as the engine made it: the decision log that reports read
    to show the cost-cooling schedule and where cached prefixes were reused.

    Attributes:
        trial_id: The trial the config was suggested for.
        phase: ``"warmup"``, ``"bo"``, ``"random"``, or ``"given"`` (a config the
            caller chose, see :meth:`BOEngine.register`).
        eta: The cost exponent of the decision. A BO step: the one its
            acquisition used (computed with the proposal, which under a
            lookahead is a little before the hand-out); otherwise the value
            :attr:`BOEngine.eta` had (1 during warm-up for EEIPU and CArBO, 0 for
            EI and random search).
        budget_spent: Cost charged by finished trials when the config was handed out.
        planned_prefix_depth: Leading stages expected to be loaded from the cache.
        source_trial: The trial whose cached prefix the config extends (BO steps
            that reuse a prefix), else ``None``.
        acquisition_value: The chosen candidate's acquisition value, on the
            acquisition's scale (``log EI + eta log E[1/C]`` for EEIPU, the
            index in standard deviations of the observations for ``eeipu_gittins``);
            ``None`` when no acquisition chose the config.
    """

    trial_id: str
    phase: str
    eta: float
    budget_spent: float
    planned_prefix_depth: int = 0
    source_trial: str | None = None
    acquisition_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (``decisions.json`` of ``eeipu-ray run``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`."""
        value = data.get("acquisition_value")
        source = data.get("source_trial")
        return cls(
            trial_id=str(data["trial_id"]),
            phase=str(data["phase"]),
            eta=float(data["eta"]),
            budget_spent=float(data["budget_spent"]),
            planned_prefix_depth=int(data.get("planned_prefix_depth", 0)),
            source_trial=None if source is None else str(source),
            acquisition_value=None if value is None else float(value),
        )
