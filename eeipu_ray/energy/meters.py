"""Energy meters behind one interface: NVML for the trial's GPUs, RAPL for the CPU
packages, or none.

A meter is a cumulative counter (:meth:`EnergyMeter.joules`) read at the start
and the end of what is measured; :meth:`EnergyMeter.begin` returns an
:class:`EnergySpan` whose :meth:`~EnergySpan.read` gives an
:class:`EnergyReading`. Every reading says what it is:

* ``joules``: energy over the span, or ``None`` when there is no meter. A
  missing meter is never reported as 0 J.
* ``source``: ``"nvml"``, ``"rapl"``, ``"nvml+rapl"`` or ``"none"``.
* ``measured``: True only when the joules come from a hardware energy counter.
  Nothing here estimates energy (no power x time models, no TDP guesses), so
  a reading is either measured or has no joules at all.
* ``cpu_seconds``: CPU time of this process over the span
  (``time.process_time``: every thread of the process, not its children). It is
  always there and is labelled as CPU-seconds, never converted to joules: a
  proxy where no meter exists.
* ``shared``: True when the metered device also served other work during the
  span, so the joules include that work (see below).

What the counters cover, and double counting:

* NVML (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver
  loaded; Volta and newer) measures whole GPUs. A trial given a fraction of a
  GPU, or a MIG slice (whose energy NVML reports for the parent GPU only), gets
  the whole GPU's energy: readings are marked ``shared`` and two trials on one
  GPU are each charged the energy of both.
* RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``, the ``package-N``
  zones) measures whole CPU packages, including every other process on them:
  its readings are always ``shared``. Concurrent trials on one node are each
  charged the package energy of all of them; run one trial per node (or per
  socket) when RAPL joules must add up. The counters wrap at
  ``max_energy_range_uj``; a wrap between two reads is corrected, and a poller
  thread reads every ``poll_seconds`` so that a long span cannot hide a wrap.
  Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694);
  unreadable counters mean no RAPL meter.

Ids of GPUs: integers are NVML indices (physical, PCI order). CUDA numbers GPUs
fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; Ray's GPU ids follow
``CUDA_VISIBLE_DEVICES`` as the node started with it, so on nodes with mixed
GPU models set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (or give GPUs as UUIDs,
``GPU-...``/``MIG-...``, which are unambiguous).
"""

from __future__ import annotations

import abc
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eeipu_ray.errors import EnergyMeterError

logger = logging.getLogger(__name__)

#: Environment variable choosing the meters: ``auto`` (default), ``none``, or a
#: comma-separated list of ``nvml``, ``rapl``.
ENERGY_METERS_ENV = "EEIPU_ENERGY_METERS"
#: Where Linux exposes RAPL.
POWERCAP_ROOT = "/sys/class/powercap"

SOURCE_NONE = "none"
_KINDS = ("nvml", "rapl")
_PACKAGE_ZONE_RE = re.compile(r"^intel-rapl:\d+$")


@dataclass(frozen=True)
class EnergyReading:
    """What a meter saw over one span.

    Attributes:
        joules: Energy over the span; ``None`` when no meter measured it.
        source: The meter: ``"nvml"``, ``"rapl"``, ``"nvml+rapl"``, ``"none"``.
        measured: True only for joules read from a hardware energy counter.
        cpu_seconds: CPU time of this process over the span (a proxy, in seconds).
        wall_seconds: Wall-clock time of the span.
        devices: What was metered (``"gpu:<uuid>"``, ``"cpu:package-0"``, ...).
        shared: The devices also served other work during the span, which the
            joules include (fractional or MIG GPUs; RAPL packages always).
    """

    joules: float | None
    source: str
    measured: bool
    cpu_seconds: float
    wall_seconds: float
    devices: tuple[str, ...] = ()
    shared: bool = False

    def __post_init__(self) -> None:
        if self.joules is None:
            if self.measured:
                raise ValueError("a reading without joules cannot be 'measured'")
        elif not (math.isfinite(self.joules) and self.joules >= 0.0):
            raise ValueError(f"joules={self.joules!r} must be a finite number >= 0 or None")
        elif not self.measured:
            # Nothing in this package estimates energy: joules are always measured.
            raise ValueError("joules that were not measured are not reported; use None")


class EnergyMeter(abc.ABC):
    """A cumulative energy counter over some devices.

    Subclasses implement :meth:`joules`; ``source``, ``devices`` and ``shared``
    describe what is counted. Open meters may hold a library handle or a
    thread: close them (or use ``with``).

    Example:
        >>> with auto_meter(gpu_ids=[]) as meter:
        ...     span = meter.begin()
        ...     work()
        ...     reading = span.read()
        >>> reading.joules, reading.source, reading.measured  # no meter here
        (None, 'none', False)
    """

    source: str = SOURCE_NONE
    devices: tuple[str, ...] = ()
    shared: bool = False

    @property
    def measured(self) -> bool:
        """Whether readings of this meter carry measured joules."""
        return self.source != SOURCE_NONE

    @abc.abstractmethod
    def joules(self) -> float | None:
        """Energy counted since the meter was opened, in joules (``None``: no meter).

        Raises:
            EnergyMeterError: the counter could not be read.
        """

    def begin(self) -> EnergySpan:
        """Start a span now; read it with :meth:`EnergySpan.read`."""
        return EnergySpan(self, self._safe_joules(), time.process_time(), time.perf_counter())

    def close(self) -> None:  # noqa: B027  (meters without resources need no close)
        """Release what the meter holds (library handles, the poller thread)."""

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _safe_joules(self) -> float | None:
        try:
            return self.joules()
        except EnergyMeterError as exc:
            # A meter that fails mid-run costs the trial its energy figure, not its result.
            logger.warning("%s energy meter failed: %s; energy not measured", self.source, exc)
            return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, devices={list(self.devices)})"


@dataclass(frozen=True)
class EnergySpan:
    """The start of a measurement: counters as they were when it began."""

    meter: EnergyMeter
    start_joules: float | None
    start_cpu: float
    start_wall: float

    def read(self) -> EnergyReading:
        """Energy, CPU and wall time from the start of the span until now
        (callable any number of times, e.g. for progress reports)."""
        now = self.meter._safe_joules() if self.start_joules is not None else None
        joules = None if now is None else max(0.0, now - float(self.start_joules or 0.0))
        measured = joules is not None
        return EnergyReading(
            joules=joules,
            source=self.meter.source if measured else SOURCE_NONE,
            measured=measured,
            cpu_seconds=max(0.0, time.process_time() - self.start_cpu),
            wall_seconds=max(0.0, time.perf_counter() - self.start_wall),
            devices=self.meter.devices if measured else (),
            shared=self.meter.shared if measured else False,
        )


class NoMeter(EnergyMeter):
    """No energy meter: readings carry ``joules=None`` and CPU-seconds only.

    Args:
        reasons: Per meter kind, why it is not available (shown in errors).
    """

    def __init__(self, reasons: Mapping[str, str] | None = None) -> None:
        self.reasons = dict(reasons or {})

    def joules(self) -> float | None:
        return None

    def explain(self) -> str:
        """One sentence per meter kind that was tried and why it is unavailable."""
        if not self.reasons:
            return "no energy meter was requested"
        return "; ".join(f"{kind}: {why}" for kind, why in self.reasons.items())


class NvmlMeter(EnergyMeter):
    """GPU energy from NVML's total-energy counters.

    Args:
        gpu_ids: The GPUs to meter: NVML indices (``0``, ``"1"``) or UUIDs
            (``"GPU-..."``; ``"MIG-..."`` meters the MIG slice's parent GPU,
            marked shared). ``None``: every GPU NVML sees. A GPU listed twice
            (say, by index and by UUID) is counted once.
        nvml: The NVML binding (``pynvml`` from ``nvidia-ml-py`` by default);
            tests pass a stand-in module object.
        shared: The GPUs are shared with other trials (a fractional GPU
            request): readings are marked shared.

    Raises:
        EnergyMeterError: ``nvidia-ml-py`` is missing, NVML cannot start, an id
            names no GPU, or a GPU has no total-energy counter (pre-Volta).
    """

    source = "nvml"

    def __init__(
        self,
        gpu_ids: Sequence[str | int] | None = None,
        *,
        nvml: Any = None,
        shared: bool = False,
    ) -> None:
        self._nvml = nvml if nvml is not None else _import_pynvml()
        error = self._nvml.NVMLError
        try:
            self._nvml.nvmlInit()
        except error as exc:
            raise EnergyMeterError(f"NVML could not start ({exc}): no NVIDIA driver?") from exc
        self._open = True
        try:
            self._handles, mig = self._resolve(gpu_ids)
            for uuid, handle in self._handles.items():
                try:
                    self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                except error as exc:
                    raise EnergyMeterError(
                        f"GPU {uuid} has no NVML total-energy counter ({exc}); the counter "
                        "needs a Volta or newer GPU"
                    ) from exc
            self.devices = tuple(f"gpu:{uuid}" for uuid in self._handles)
            self.shared = bool(shared or mig)
            self._origin_mj = self._total_mj()
        except BaseException:
            self.close()
            raise

    def _resolve(self, gpu_ids: Sequence[str | int] | None) -> tuple[dict[str, Any], bool]:
        nvml, error = self._nvml, self._nvml.NVMLError
        if gpu_ids is None:
            gpu_ids = list(range(int(nvml.nvmlDeviceGetCount())))
        if not gpu_ids:
            raise EnergyMeterError("NVML: no GPUs to meter (the trial has none)")
        handles: dict[str, Any] = {}
        mig = False
        for gpu_id in gpu_ids:
            text = str(gpu_id).strip()
            try:
                if text.startswith("MIG-"):
                    # NVML counts energy per physical GPU: meter the parent, shared.
                    handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
                        nvml.nvmlDeviceGetHandleByUUID(text)
                    )
                    mig = True
                elif text.startswith("GPU-"):
                    handle = nvml.nvmlDeviceGetHandleByUUID(text)
                elif text.isdigit():
                    handle = nvml.nvmlDeviceGetHandleByIndex(int(text))
                else:
                    raise EnergyMeterError(
                        f"NVML: GPU id {gpu_id!r} is neither an index nor a GPU-/MIG- UUID"
                    )
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except error as exc:
                raise EnergyMeterError(f"NVML: no GPU {gpu_id!r} ({exc})") from exc
            handles.setdefault(uuid, handle)
        return handles, mig

    def _total_mj(self) -> int:
        try:
            return sum(
                int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h))
                for h in self._handles.values()
            )
        except self._nvml.NVMLError as exc:
            raise EnergyMeterError(f"NVML: reading the energy counter failed ({exc})") from exc

    def joules(self) -> float | None:
        delta = self._total_mj() - self._origin_mj
        if delta < 0:  # the driver reloaded: the counter restarted
            raise EnergyMeterError("NVML: the energy counter went backwards (driver reloaded?)")
        return delta / 1e3

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)


class RaplMeter(EnergyMeter):
    """CPU package energy from Linux's powercap RAPL counters.

    Sums the top-level ``intel-rapl:N`` zones named ``package-N`` (their core
    and uncore subzones are part of them; DRAM and ``psys`` zones are left out),
    corrects counter wrap-around with ``max_energy_range_uj``, and reads every
    ``poll_seconds`` in a daemon thread so that no wrap goes unseen. Readings
    are always marked shared: a package counts every process on it.

    Args:
        root: The powercap directory (tests pass a fake sysfs tree).
        poll_seconds: Read interval of the poller thread; ``None``: no thread
            (wraps are corrected at every read only).

    Raises:
        EnergyMeterError: no package zones, or their counters are not readable.
    """

    source = "rapl"
    shared = True

    def __init__(
        self, root: str | os.PathLike[str] = POWERCAP_ROOT, *, poll_seconds: float | None = 5.0
    ) -> None:
        if poll_seconds is not None and not poll_seconds > 0:
            raise ValueError(f"poll_seconds={poll_seconds!r} must be > 0 or None")
        base = Path(root)
        zones: list[tuple[str, Path, int]] = []
        candidates = sorted(base.glob("intel-rapl:*")) if base.is_dir() else []
        for zone in candidates:
            if not _PACKAGE_ZONE_RE.fullmatch(zone.name):
                continue
            try:
                name = (zone / "name").read_text().strip()
                if not name.startswith("package"):
                    continue
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append((name, zone / "energy_uj", max_range))
        if not zones:
            raise EnergyMeterError(f"RAPL: no readable CPU package zones under {str(base)!r}")
        self._zones = zones
        self._lock = threading.Lock()
        self._last = [self._read_uj(path) for _, path, _ in zones]
        self._total_uj = 0
        self.devices = tuple(f"cpu:{name}" for name, _, _ in zones)
        #: Polls that read every zone, and polls that failed (the poller goes on).
        self.polls = 0
        self.poll_failures = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if poll_seconds is not None:
            self._poller = threading.Thread(
                target=self._poll, args=(poll_seconds,), name="eeipu-rapl-poller", daemon=True
            )
            self._poller.start()

    @staticmethod
    def _read_uj(path: Path) -> int:
        try:
            return int(path.read_text())
        except PermissionError as exc:
            raise EnergyMeterError(
                f"RAPL: {str(path)!r} is not readable by this user (root only since Linux "
                "5.10, CVE-2020-8694); an administrator can grant read access "
                f"(chmod a+r {path})"
            ) from exc
        except (OSError, ValueError) as exc:
            raise EnergyMeterError(f"RAPL: cannot read {str(path)!r}: {exc}") from exc

    def _advance(self) -> int:
        with self._lock:
            for i, (_, path, max_range) in enumerate(self._zones):
                raw = self._read_uj(path)
                delta = raw - self._last[i]
                if delta < 0:  # wrapped past max_energy_range_uj once
                    delta += max_range
                self._total_uj += delta
                self._last[i] = raw
            return self._total_uj

    def _poll(self, interval: float) -> None:
        # A failed read skips one poll; the next one counts what happened since
        # the last good read (at most one wrap is then seen as one). Warn once
        # per run of failures, not at every poll.
        failing = False
        while not self._stop.wait(interval):
            try:
                self._advance()
            except EnergyMeterError as exc:
                self.poll_failures += 1
                if not failing:
                    logger.warning("RAPL poll failed (polling goes on): %s", exc)
                failing = True
                continue
            failing = False
            self.polls += 1

    def joules(self) -> float | None:
        return self._advance() / 1e6

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=5.0)
            self._poller = None


class CompositeMeter(EnergyMeter):
    """The sum of several meters (GPU and CPU energy of one trial)."""

    def __init__(self, meters: Sequence[EnergyMeter]) -> None:
        if not meters:
            raise ValueError("CompositeMeter needs at least one meter")
        self.meters = list(meters)
        self.source = "+".join(m.source for m in self.meters)
        self.devices = tuple(d for m in self.meters for d in m.devices)
        self.shared = any(m.shared for m in self.meters)

    def joules(self) -> float | None:
        parts = [m.joules() for m in self.meters]
        if any(p is None for p in parts):
            return None
        return float(math.fsum(p for p in parts if p is not None))

    def close(self) -> None:
        for m in self.meters:
            m.close()


@dataclass(frozen=True)
class _Choice:
    kinds: tuple[str, ...]
    auto: bool = False


def _parse_kinds(kinds: str | Sequence[str] | None) -> _Choice:
    if kinds is None:
        kinds = os.environ.get(ENERGY_METERS_ENV, "auto")
    if isinstance(kinds, str):
        kinds = [k.strip().lower() for k in kinds.split(",") if k.strip()]
    kinds = list(kinds)
    if kinds in ([], ["auto"]):
        return _Choice(_KINDS, auto=True)
    if kinds == ["none"]:
        return _Choice(())
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown:
        raise EnergyMeterError(
            f"energy meters {unknown} are unknown (from {ENERGY_METERS_ENV} or kinds=): use "
            "'auto', 'none', or a comma-separated list of 'nvml', 'rapl'"
        )
    return _Choice(tuple(dict.fromkeys(kinds)))


def auto_meter(
    gpu_ids: Sequence[str | int] | None = None,
    *,
    kinds: str | Sequence[str] | None = None,
    shared_gpu: bool = False,
    nvml: Any = None,
    powercap_root: str | os.PathLike[str] | None = None,
    poll_seconds: float | None = 5.0,
) -> EnergyMeter:
    """The meters this process can use, combined: NVML for ``gpu_ids`` and RAPL
    for the CPU packages, each where it works; :class:`NoMeter` otherwise.

    Args:
        gpu_ids: The trial's GPUs (``ray.get_gpu_ids()``; ``[]``: none, so no
            NVML meter); ``None``: every GPU NVML sees.
        kinds: ``"auto"`` (both where available), ``"none"``, or ``"nvml"``,
            ``"rapl"``, ``"nvml,rapl"``; default ``$EEIPU_ENERGY_METERS`` or auto.
            A kind asked for by name that is unavailable is an error.
        shared_gpu: The trial holds a fraction of its GPUs (readings marked shared).
        nvml: NVML binding to use instead of ``pynvml`` (tests).
        powercap_root: Where RAPL zones live (default ``POWERCAP_ROOT``).
        poll_seconds: RAPL poller interval.

    Returns:
        An open meter (close it), with ``reasons`` on a :class:`NoMeter`.

    Raises:
        EnergyMeterError: a meter named in ``kinds`` is unavailable.
    """
    choice = _parse_kinds(kinds)
    meters: list[EnergyMeter] = []
    reasons: dict[str, str] = {}
    for kind in choice.kinds:
        try:
            if kind == "nvml":
                if gpu_ids is not None and not list(gpu_ids):
                    raise EnergyMeterError("the trial has no GPUs")
                meters.append(NvmlMeter(gpu_ids, nvml=nvml, shared=shared_gpu))
            else:
                root = POWERCAP_ROOT if powercap_root is None else powercap_root
                meters.append(RaplMeter(root, poll_seconds=poll_seconds))
        except EnergyMeterError as exc:
            if not choice.auto:
                for m in meters:
                    m.close()
                raise EnergyMeterError(f"energy meter {kind!r} is unavailable: {exc}") from exc
            reasons[kind] = str(exc)
    if not choice.kinds:
        reasons["all"] = f"energy metering is off ({ENERGY_METERS_ENV}=none)"
    if not meters:
        return NoMeter(reasons)
    if reasons:
        logger.debug("energy meters unavailable: %s", reasons)
    return meters[0] if len(meters) == 1 else CompositeMeter(meters)


def visible_gpu_ids() -> list[str] | None:
    """GPUs in ``CUDA_VISIBLE_DEVICES`` (``None`` when unset: all are visible)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "-1"]


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise EnergyMeterError(
            "the NVML binding is not installed (pip install 'eeipu-ray[energy]', which "
            "brings nvidia-ml-py)"
        ) from exc
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
