"""Test doubles at the hardware edge only: an NVML binding and a powercap sysfs tree.

``FakeNVML`` stands in for the ``pynvml`` module (the functions and the
``NVMLError`` class that :class:`~eeipu_ray.energy.NvmlMeter` calls); its
per-GPU energy counters (millijoules) advance only when a test says so.
``fake_powercap`` writes a directory laid out like ``/sys/class/powercap``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class FakeNVMLError(Exception):
    def __init__(self, value: int, text: str = "") -> None:
        super().__init__(text or f"NVML error {value}")
        self.value = value


NOT_SUPPORTED = 3
NOT_FOUND = 6
LIBRARY_NOT_FOUND = 12


@dataclass
class FakeGPU:
    uuid: str
    energy_mj: int = 0
    supports_energy: bool = True
    migs: tuple[str, ...] = ()
    memory_bytes: int = 80 * 2**30


@dataclass
class FakeNVML:
    """A stand-in for the ``pynvml`` module; handles are the GPUs themselves."""

    gpus: list[FakeGPU] = field(default_factory=list)
    fail_init: bool = False
    inits: int = 0
    shutdowns: int = 0
    NVMLError: type[Exception] = FakeNVMLError

    @classmethod
    def with_gpus(cls, n: int, **kwargs: object) -> FakeNVML:
        return cls([FakeGPU(f"GPU-{i:08d}-fake") for i in range(n)], **kwargs)  # type: ignore[arg-type]

    def spend(self, index: int, millijoules: int) -> None:
        """GPU ``index`` consumes ``millijoules``."""
        self.gpus[index].energy_mj += millijoules

    # --- the pynvml functions the meter calls ---
    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError(LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGPU:
        if not 0 <= index < len(self.gpus):
            raise FakeNVMLError(NOT_FOUND, "Not Found")
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGPU | tuple[str, FakeGPU]:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            if uuid in gpu.migs:
                return ("mig", gpu)
        raise FakeNVMLError(NOT_FOUND, "Not Found")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: object) -> FakeGPU:
        assert isinstance(handle, tuple) and handle[0] == "mig"
        return handle[1]

    def nvmlDeviceGetUUID(self, handle: FakeGPU) -> bytes:
        return handle.uuid.encode()  # old bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGPU) -> object:
        return type("Memory", (), {"total": handle.memory_bytes, "free": handle.memory_bytes})()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGPU) -> int:
        if not isinstance(handle, FakeGPU):
            raise FakeNVMLError(NOT_SUPPORTED, "Not Supported")  # a MIG handle
        if not handle.supports_energy:
            raise FakeNVMLError(NOT_SUPPORTED, "Not Supported")
        return handle.energy_mj


def fake_powercap(root: Path, packages: dict[int, tuple[int, int]]) -> Path:
    """A powercap tree: ``packages[n] = (energy_uj, max_energy_range_uj)`` for zone
    ``intel-rapl:n`` (``package-n``), each with a ``core`` subzone, plus a ``psys``
    zone; the meter must count the packages only."""
    for n, (energy, max_range) in packages.items():
        zone = root / f"intel-rapl:{n}"
        zone.mkdir(parents=True)
        (zone / "name").write_text(f"package-{n}\n")
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = root / f"intel-rapl:{n}:0"
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("999999\n")
        (sub / "max_energy_range_uj").write_text(f"{max_range}\n")
    psys = root / f"intel-rapl:{len(packages)}"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("123456789\n")
    (psys / "max_energy_range_uj").write_text("262143328850\n")
    return root


def set_uj(root: Path, n: int, energy_uj: int | str) -> None:
    # Replaced in one step: a sysfs counter read is atomic, never half-written.
    path = root / f"intel-rapl:{n}" / "energy_uj"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{energy_uj}\n")
    os.replace(tmp, path)
