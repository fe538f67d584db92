"""`SM2Scheduler`: energy-aware, hardware-aware successive halving for Ray Tune.

SM2 ("Spend More to Save More", Geissler et al., arXiv 2412.08526) starts many
configurations, trains each a little, and stops the ones that rank low on
performance *and* energy; configurations the hardware cannot run are never
started. The scheduler promotes asynchronously, as ASHA does, so it works with
any number of concurrent trials and with any searcher (``EEIPUSearcher``,
Optuna, ...): the searcher proposes, the scheduler only stops.

Rungs are at ``grace_period * reduction_factor**k`` below ``max_t``, in epochs
(``time_attr="epoch"``) or in joules (``time_attr="total_energy_joules"``).
When a trial first reaches a rung it scores::

    S = P - energy_weight * ln(max(E, energy_floor)) + lr_weight * ln(lr)

with ``P`` its metric (larger is better), ``E`` the energy it has spent so far
(``energy_attr``) and ``lr`` its learning rate (``lr_key``), and it goes on only
if ``S`` is at least the ``1 - 1/reduction_factor`` quantile of the scores
recorded at that rung before it. ``energy_weight=0`` is ASHA.

The knobs (:class:`SM2Scheduler`): ``time_attr``, ``max_t``,
``grace_period``, ``reduction_factor`` (the rungs); ``energy_attr``
(``total_energy_joules``, or ``total_cpu_seconds`` where no meter exists),
``energy_weight`` (default 0.05: twice the energy costs 0.035 of the metric),
``energy_floor``, ``lr_key`` and ``lr_weight`` (default 0) for the score;
``fits(config) -> bool`` (e.g. :func:`fits_device_memory`), asked before a
trial starts; ``stop_last_trials`` (off, so a pipeline's evaluation stage runs
after its training). A pipeline trial reports to the scheduler when a stage
calls ``ctx.report`` with the metric (the CNN pipeline with
``report_score=True``).

Example::

    scheduler = SM2Scheduler("epoch", metric="score", mode="max", max_t=12,
                             energy_weight=0.05,
                             fits=fits_device_memory(estimate_bytes, "auto"))
    tune.Tuner(trainable, tune_config=tune.TuneConfig(
        scheduler=scheduler, search_alg=EEIPUSearcher(pipeline, ...))).fit()

Why the score has this form, and how unfit and stopped trials are charged:
docs/energy.md, "SM2Scheduler".
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from eeipu_ray import result as R
from eeipu_ray.errors import EnergyMeterError

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SM2Options:
    """Settings of :class:`SM2Scheduler` (see its docstring), validated once.

    Raises:
        ValueError: naming the first invalid setting.
    """

    time_attr: str = "epoch"
    energy_attr: str = R.TOTAL_ENERGY_JOULES
    max_t: float = 100.0
    grace_period: float = 1.0
    reduction_factor: float = 3.0
    energy_weight: float = 0.05
    lr_key: str | None = None
    lr_weight: float = 0.0
    energy_floor: float = 1e-6
    stop_last_trials: bool = False

    def __post_init__(self) -> None:
        for name in ("time_attr", "energy_attr"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty result key")
        numbers = {
            "max_t": self.max_t,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
            "energy_weight": self.energy_weight,
            "lr_weight": self.lr_weight,
            "energy_floor": self.energy_floor,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}={value!r} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be finite")
        if not self.grace_period > 0:
            raise ValueError(f"grace_period={self.grace_period!r} must be > 0")
        if not self.max_t >= self.grace_period:
            raise ValueError(f"max_t={self.max_t!r} must be >= grace_period={self.grace_period!r}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be > 1")
        if self.energy_weight < 0:
            raise ValueError(
                f"energy_weight={self.energy_weight!r} must be >= 0 (0: performance only, "
                "which is ASHA)"
            )
        if not self.energy_floor > 0:
            raise ValueError(f"energy_floor={self.energy_floor!r} must be > 0")
        if self.lr_weight != 0 and not self.lr_key:
            raise ValueError(
                f"lr_weight={self.lr_weight!r} needs lr_key, the config key of the learning "
                "rate (e.g. 'train/lr')"
            )

    @property
    def milestones(self) -> list[float]:
        """Rung sizes in ``time_attr`` units, ascending, below ``max_t``."""
        out, k = [], 0
        while True:
            t = self.grace_period * self.reduction_factor**k
            if t >= self.max_t * (1 - 1e-12):
                return out
            out.append(float(t))
            k += 1


def sm2_score(
    performance: float,
    energy: float | None,
    learning_rate: float | None = None,
    *,
    energy_weight: float = 0.05,
    lr_weight: float = 0.0,
    energy_floor: float = 1e-6,
) -> float:
    """``S = P - energy_weight * ln(max(E, energy_floor)) + lr_weight * ln(lr)``.

    Args:
        performance: The metric, larger is better (``nan`` gives ``nan``).
        energy: Energy spent so far (any one unit); ignored when
            ``energy_weight`` is 0, required otherwise.
        learning_rate: Used when ``lr_weight`` is not 0 (must be > 0).

    Example:
        >>> round(sm2_score(0.90, 100.0) - sm2_score(0.90, 200.0), 4)  # 2x energy
        0.0347
    """
    score = float(performance)
    if energy_weight:
        if energy is None or not math.isfinite(energy):
            raise ValueError(f"energy {energy!r} must be a finite number")
        score -= energy_weight * math.log(max(float(energy), energy_floor))
    if lr_weight:
        if learning_rate is None or not learning_rate > 0:
            raise ValueError(f"learning rate {learning_rate!r} must be > 0")
        score += lr_weight * math.log(float(learning_rate))
    return score


def fits_device_memory(
    estimate: Callable[[Mapping[str, Any]], float],
    device_memory: int | str = "auto",
    *,
    headroom: float = 0.9,
    nvml: Any = None,
) -> Callable[[Mapping[str, Any]], bool]:
    """A ``fits`` predicate: ``estimate(config) <= headroom * device_memory``.

    Args:
        estimate: Bytes of device memory a configuration needs (e.g.
            :func:`eeipu_ray.pipelines.cnn.training_memory_bytes`).
        device_memory: Bytes of the device the trials run on, or ``"auto"``:
            the smallest GPU NVML sees on this (the driver's) machine; give the
            number when the driver has no GPU or the workers' GPUs differ.
        headroom: Fraction of the memory a trial may plan to use (allocator
            fragmentation, the CUDA context).
        nvml: NVML binding instead of ``pynvml`` (tests).

    Raises:
        EnergyMeterError: ``"auto"`` and NVML sees no GPU here.
    """
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom={headroom!r} must be in (0, 1]")
    if device_memory == "auto":
        device_memory = _smallest_gpu_memory(nvml)
    if isinstance(device_memory, bool) or not isinstance(device_memory, int | float):
        raise ValueError(f"device_memory={device_memory!r} must be bytes or 'auto'")
    if not device_memory > 0:
        raise ValueError(f"device_memory={device_memory!r} must be > 0")
    limit = headroom * float(device_memory)
    return _MemoryFit(estimate, limit)


@dataclass(frozen=True)
class _MemoryFit:
    estimate: Callable[[Mapping[str, Any]], float]
    limit: float

    def __call__(self, config: Mapping[str, Any]) -> bool:
        return float(self.estimate(config)) <= self.limit


@dataclass
class _Rung:
    milestone: float
    recorded: dict[str, float]


class SM2Scheduler(FIFOScheduler):
    """Energy-aware, hardware-aware successive halving (SM2) as a Tune scheduler.

    See the module docstring for the score ``S = P - alpha ln E + beta ln lr``,
    and docs/energy.md for why it has that form.

    Args:
        time_attr: Progress key of the rungs: ``"epoch"`` (default),
            ``"training_iteration"``, or an energy key such as
            ``"total_energy_joules"`` (rungs in energy).
        metric: The metric (or from ``TuneConfig(metric=...)``).
        mode: ``"max"`` or ``"min"`` (or from ``TuneConfig(mode=...)``).
        energy_attr: Result key of the energy spent so far: joules
            (``total_energy_joules``, measured) by default, or
            ``total_cpu_seconds`` (process CPU time, a proxy where no meter
            exists). A result with the metric but without this key raises
            :class:`~eeipu_ray.errors.EnergyMeterError` (unless
            ``energy_weight`` is 0).
        max_t: Most ``time_attr`` units a trial may run.
        grace_period: The first rung.
        reduction_factor: Rung spacing; the top ``1 / reduction_factor`` of a
            rung continue.
        energy_weight: ``alpha``, metric units per e-fold of energy (0: ASHA).
        lr_key: Config key of the learning rate (flat, ``"train/lr"``).
        lr_weight: ``beta`` (0 by default: see docs/energy.md).
        energy_floor: Energies below this count as this (so that a reading of
            0 J, a counter too coarse for a tiny step, does not dominate).
        fits: ``fits(config) -> bool``: configurations for which it is false
            are stopped before they start (hardware awareness).
        stop_last_trials: Stop trials that reach ``max_t`` (ASHA's default; off
            here so that a pipeline's evaluation stage runs after its training).

    Example:
        >>> scheduler = SM2Scheduler(time_attr="epoch", metric="score", mode="max",
        ...                          max_t=12, grace_period=1, reduction_factor=3,
        ...                          fits=fits_device_memory(training_memory_bytes))
        >>> tune.Tuner(trainable, tune_config=tune.TuneConfig(
        ...     scheduler=scheduler, search_alg=EEIPUSearcher(pipeline, ...))).fit()
    """

    def __init__(
        self,
        time_attr: str = "epoch",
        metric: str | None = None,
        mode: str | None = None,
        *,
        energy_attr: str = R.TOTAL_ENERGY_JOULES,
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 3,
        energy_weight: float = 0.05,
        lr_key: str | None = None,
        lr_weight: float = 0.0,
        energy_floor: float = 1e-6,
        fits: Callable[[Mapping[str, Any]], bool] | None = None,
        stop_last_trials: bool = False,
    ) -> None:
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
        if fits is not None and not callable(fits):
            raise ValueError(f"fits={fits!r} must be a callable fits(config) -> bool")
        super().__init__()
        self.options = SM2Options(
            time_attr=time_attr,
            energy_attr=energy_attr,
            max_t=float(max_t),
            grace_period=float(grace_period),
            reduction_factor=float(reduction_factor),
            energy_weight=float(energy_weight),
            lr_key=lr_key,
            lr_weight=float(lr_weight),
            energy_floor=float(energy_floor),
            stop_last_trials=stop_last_trials,
        )
        self._metric = metric
        self._mode = mode
        self._fits = fits
        self._rungs = [_Rung(m, {}) for m in self.options.milestones]
        self._live: set[str] = set()
        self._unfit: dict[str, str] = {}
        self._num_stopped = 0
        self.decisions: list[dict[str, Any]] = []

    # ------------------------------------------------------------ set-up
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    @property
    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """``(milestone, {trial_id: score})`` per rung, ascending."""
        return [(r.milestone, dict(r.recorded)) for r in self._rungs]

    # ------------------------------------------------------------ Tune API
    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise ValueError(
                f"SM2Scheduler needs metric and mode (got {self._metric!r}, {self._mode!r}): "
                "pass them to the scheduler or to tune.TuneConfig(metric=..., mode=...)"
            )
        self._live.add(trial.trial_id)
        if self._fits is None:
            return
        try:
            ok = bool(self._fits(trial.config))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"SM2Scheduler: fits(config) failed for trial {trial.trial_id} with config "
                f"{trial.config!r}: {exc!r}"
            ) from exc
        if not ok:
            self._unfit[trial.trial_id] = "does not fit the device"
            self._log(trial.trial_id, None, "skip", reason="does not fit the device")
            logger.info(
                "SM2Scheduler: trial %s does not fit the device; it will not start",
                trial.trial_id,
            )

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        # Trials that do not fit are stopped while pending: Tune starts actors for
        # pending trials right after asking this method, so they never run.
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING and trial.trial_id in self._unfit:
                if getattr(trial, "storage", None) is not None:
                    # Tune gives a trial its directory when it schedules it; one
                    # stopped before that would break Tune's reporting and results.
                    trial.init_local_path()
                tune_controller.stop_trial(trial)
                self._num_stopped += 1
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in tune_controller.get_trials():
                if trial.status == status and trial.trial_id not in self._unfit:
                    return trial
        return None

    def on_trial_result(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> str:
        if trial.trial_id in self._unfit:  # it started after all: stop it at once
            self._num_stopped += 1
            return TrialScheduler.STOP
        if self.options.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        t = float(result[self.options.time_attr])
        if t >= self.options.max_t and self.options.stop_last_trials:
            self._num_stopped += 1
            return TrialScheduler.STOP
        action = self._decide(trial, t, result)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> None:
        if (
            trial.trial_id in self._live
            and trial.trial_id not in self._unfit
            and self.options.time_attr in result
            and self._metric in result
        ):
            self._decide(trial, float(result[self.options.time_attr]), result)
        self._live.discard(trial.trial_id)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._live.discard(trial.trial_id)

    def debug_string(self) -> str:
        rungs = " | ".join(
            f"{r.milestone:g}: {len(r.recorded)} recorded, cutoff {_fmt(self._cutoff(r))}"
            for r in self._rungs
        )
        return (
            f"Using SM2 (energy-aware successive halving): stopped={self._num_stopped}, "
            f"not fitting={len(self._unfit)}; rungs {rungs}"
        )

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))

    # ------------------------------------------------------------ helpers
    def score(self, trial: Trial | Mapping[str, Any], result: Mapping[str, Any]) -> float:
        """The combined score ``S`` of a result (``trial`` or its config gives the
        learning rate). ``nan`` when the metric is not a finite number.

        Raises:
            EnergyMeterError: the energy is needed and the result lacks it.
        """
        opts = self.options
        sign = 1.0 if self._mode == "max" else -1.0
        value = result.get(self._metric)
        performance = sign * float(value) if _finite(value) else math.nan
        energy = None
        if opts.energy_weight:
            energy = result.get(opts.energy_attr)
            if not _finite(energy):
                raise EnergyMeterError(
                    f"SM2Scheduler ranks by energy, but a result of trial "
                    f"{getattr(trial, 'trial_id', '?')} has no {opts.energy_attr!r} "
                    f"(got {energy!r}): no energy meter where it ran. Run on nodes with NVML "
                    "or readable RAPL, or rank by process CPU time with "
                    "energy_attr='total_cpu_seconds' (CPU-seconds, not joules)"
                )
        lr = None
        if opts.lr_weight:
            config = trial.config if isinstance(trial, Trial) else trial
            lr = _lookup(config, opts.lr_key or "")
        if math.isnan(performance):
            return math.nan
        return sm2_score(
            performance,
            None if energy is None else float(energy),
            lr,
            energy_weight=opts.energy_weight,
            lr_weight=opts.lr_weight,
            energy_floor=opts.energy_floor,
        )

    def _decide(self, trial: Trial, t: float, result: Mapping[str, Any]) -> str:
        # The highest rung the trial has reached and not been judged at (as ASHA).
        for rung in reversed(self._rungs):
            if t < rung.milestone:
                continue
            if trial.trial_id in rung.recorded:
                return TrialScheduler.CONTINUE
            score = self.score(trial, result)
            cutoff = self._cutoff(rung)
            stop = cutoff is not None and not (score >= cutoff)  # nan never passes
            if not math.isnan(score):
                rung.recorded[trial.trial_id] = score
            self._log(
                trial.trial_id,
                rung.milestone,
                "stop" if stop else "continue",
                score=score,
                cutoff=cutoff,
                metric=result.get(self._metric),
                energy=result.get(self.options.energy_attr),
            )
            return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def _cutoff(self, rung: _Rung) -> float | None:
        if not rung.recorded:
            return None
        return _percentile(list(rung.recorded.values()), 1.0 - 1.0 / self.options.reduction_factor)

    def _log(self, trial_id: str, milestone: float | None, action: str, **facts: Any) -> None:
        self.decisions.append({"trial_id": trial_id, "rung": milestone, "action": action, **facts})

    def __repr__(self) -> str:
        return f"SM2Scheduler({asdict(self.options)})"


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile ``q`` in [0, 1] (NumPy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _lookup(config: Mapping[str, Any], key: str) -> float:
    node: Any = config
    if key in config:
        node = config[key]
    else:
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"lr_key {key!r} is not in the trial's config")
            node = node[part]
    if not _finite(node):
        raise ValueError(f"lr_key {key!r} holds {node!r}, not a number")
    return float(node)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _smallest_gpu_memory(nvml: Any = None) -> int:
    from eeipu_ray.energy.meters import _import_pynvml

    nvml = nvml if nvml is not None else _import_pynvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise EnergyMeterError(
            f"device_memory='auto': NVML could not start ({exc}); pass device_memory in bytes"
        ) from exc
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            raise EnergyMeterError(
                "device_memory='auto': NVML sees no GPU on this machine; pass device_memory "
                "in bytes"
            )
        return min(
            int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total)
            for i in range(count)
        )
    finally:
        nvml.nvmlShutdown()
