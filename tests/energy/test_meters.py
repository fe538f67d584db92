"""Energy meters against doubles at the hardware edge: a fake NVML binding and a
fake powercap sysfs tree. The meter code itself (index/UUID resolution, counter
deltas, wrap-around, zone selection, automatic choice) runs for real."""

from __future__ import annotations

import pathlib
import time

import pytest

from eeipu_ray.energy import (
    ENERGY_METERS_ENV,
    CompositeMeter,
    EnergyMeterError,
    EnergyReading,
    NoMeter,
    NvmlMeter,
    RaplMeter,
    auto_meter,
    visible_gpu_ids,
)
from tests.energy.fakes import FakeNVML, fake_powercap, set_uj

MAX_RANGE = 262_143_328_850  # a real package's max_energy_range_uj


# ---------------------------------------------------------------- readings
def test_reading_never_passes_an_estimate_or_a_zero_off_as_measured():
    with pytest.raises(ValueError, match="measured"):
        EnergyReading(joules=None, source="nvml", measured=True, cpu_seconds=0, wall_seconds=0)
    with pytest.raises(ValueError, match="not measured"):
        EnergyReading(joules=3.0, source="none", measured=False, cpu_seconds=0, wall_seconds=0)
    with pytest.raises(ValueError, match="finite"):
        EnergyReading(joules=-1.0, source="rapl", measured=True, cpu_seconds=0, wall_seconds=0)


def test_no_meter_reports_missing_energy_and_cpu_seconds():
    meter = NoMeter({"nvml": "not installed"})
    span = meter.begin()
    sum(i * i for i in range(200_000))  # some CPU work
    reading = span.read()
    assert reading.joules is None and reading.source == "none" and not reading.measured
    assert reading.cpu_seconds > 0 and reading.wall_seconds > 0
    assert "nvml: not installed" in meter.explain()


# ---------------------------------------------------------------- NVML
def test_nvml_meters_only_the_trials_gpus_in_joules():
    nvml = FakeNVML.with_gpus(3)
    nvml.spend(0, 5_000)  # energy spent before the meter opened is not counted
    with NvmlMeter(["1", 2], nvml=nvml) as meter:
        span = meter.begin()
        nvml.spend(1, 1_500)  # mJ
        nvml.spend(2, 500)
        nvml.spend(0, 99_000)  # another trial's GPU
        reading = span.read()
        assert reading.joules == pytest.approx(2.0)
        assert reading.source == "nvml" and reading.measured and not reading.shared
        assert reading.devices == ("gpu:GPU-00000001-fake", "gpu:GPU-00000002-fake")
        nvml.spend(1, 1_000)
        assert span.read().joules == pytest.approx(3.0)  # cumulative from the span's start
        assert meter.joules() == pytest.approx(3.0)
    assert nvml.shutdowns == 1


def test_nvml_uuid_ids_dedup_and_mig_is_marked_shared():
    nvml = FakeNVML.with_gpus(2)
    nvml.gpus[1].migs = ("MIG-aaaa",)
    # The same GPU by index and by UUID is counted once.
    with NvmlMeter(["0", "GPU-00000000-fake"], nvml=nvml) as meter:
        span = meter.begin()
        nvml.spend(0, 700)
        assert span.read().joules == pytest.approx(0.7)
        assert meter.devices == ("gpu:GPU-00000000-fake",) and not meter.shared
    # A MIG slice: energy is the parent GPU's, so the reading says it is shared.
    with NvmlMeter(["MIG-aaaa"], nvml=nvml) as meter:
        span = meter.begin()
        nvml.spend(1, 2_000)
        reading = span.read()
        assert reading.joules == pytest.approx(2.0) and reading.shared
    with NvmlMeter(None, nvml=nvml, shared=True) as meter:  # every GPU, fractional request
        assert len(meter.devices) == 2 and meter.shared


@pytest.mark.parametrize(
    ("setup", "ids", "match"),
    [
        (lambda n: setattr(n, "fail_init", True), ["0"], "could not start"),
        (lambda n: setattr(n.gpus[0], "supports_energy", False), ["0"], "Volta"),
        (lambda n: None, ["7"], "no GPU '7'"),
        (lambda n: None, ["cuda:0"], "neither an index nor"),
        (lambda n: None, [], "no GPUs"),
    ],
)
def test_nvml_refuses_clearly(setup, ids, match):
    nvml = FakeNVML.with_gpus(1)
    setup(nvml)
    with pytest.raises(EnergyMeterError, match=match):
        NvmlMeter(ids, nvml=nvml)
    assert nvml.shutdowns == nvml.inits  # nothing left open


def test_nvml_read_failure_mid_run_is_missing_energy_not_zero():
    nvml = FakeNVML.with_gpus(1)
    with NvmlMeter(["0"], nvml=nvml) as meter:
        span = meter.begin()
        nvml.spend(0, 100)
        nvml.gpus[0].supports_energy = False  # the counter stops answering
        reading = span.read()
    assert reading.joules is None and not reading.measured and reading.source == "none"


# ---------------------------------------------------------------- RAPL
def test_rapl_sums_package_zones_and_corrects_wraparound(tmp_path):
    root = fake_powercap(tmp_path, {0: (MAX_RANGE - 1_000_000, MAX_RANGE), 1: (10, MAX_RANGE)})
    with RaplMeter(root, poll_seconds=None) as meter:
        assert meter.devices == ("cpu:package-0", "cpu:package-1")  # core and psys left out
        assert meter.shared  # a package counts every process on it
        span = meter.begin()
        set_uj(root, 0, 2_000_000)  # wrapped: 1 J to the top, then 2 J
        set_uj(root, 1, 500_010)  # 0.5 J
        reading = span.read()
    assert reading.joules == pytest.approx(3.5)
    assert reading.source == "rapl" and reading.measured and reading.shared


def _two_polls_later(meter: RaplMeter, counter: str = "polls") -> None:
    """Returns once the poller has finished two more polls: the second began after
    the caller's last write, so it saw it. Deterministic on a loaded machine; the
    deadline only guards against a dead poller."""
    target = getattr(meter, counter) + 2
    deadline = time.monotonic() + 120.0
    while getattr(meter, counter) < target:
        assert time.monotonic() < deadline, f"the RAPL poller made no {counter} in 120 s"
        time.sleep(0.005)


def test_rapl_poller_sees_a_wrap_between_two_reads(tmp_path):
    # Kind: deterministic. Each counter value is held until the poller has read
    # it (two finished polls), however slowly the machine runs.
    root = fake_powercap(tmp_path, {0: (0, 10_000_000)})
    with RaplMeter(root, poll_seconds=0.01) as meter:
        span = meter.begin()
        # 8 + 5 + 6 + 2 = 21 J, wrapping twice; only the poller sees the middle
        # values (the two reads alone would see 0 -> 1 J).
        for value in (8_000_000, 3_000_000, 9_000_000, 1_000_000):
            set_uj(root, 0, value)
            _two_polls_later(meter)
        assert span.read().joules == pytest.approx(21.0)
        assert meter.poll_failures == 0


def test_rapl_poller_goes_on_after_a_failed_read(tmp_path, caplog):
    root = fake_powercap(tmp_path, {0: (0, 10_000_000)})
    with RaplMeter(root, poll_seconds=0.01) as meter:
        span = meter.begin()
        set_uj(root, 0, 8_000_000)
        _two_polls_later(meter)
        set_uj(root, 0, "not a number")  # a read error: that poll is skipped
        _two_polls_later(meter, "poll_failures")
        set_uj(root, 0, 3_000_000)  # wrapped while the counter was unreadable
        _two_polls_later(meter)
        set_uj(root, 0, 5_000_000)
        _two_polls_later(meter)
        assert span.read().joules == pytest.approx(15.0)  # 8 + 5 (wrap) + 2
    assert meter.poll_failures >= 2
    warnings = [r for r in caplog.records if "RAPL poll failed" in r.getMessage()]
    assert len(warnings) == 1  # once per run of failures, not at every poll


def test_rapl_unreadable_or_absent_is_refused_with_the_reason(tmp_path, monkeypatch):
    with pytest.raises(EnergyMeterError, match="no readable CPU package zones"):
        RaplMeter(tmp_path / "nothing", poll_seconds=None)
    root = fake_powercap(tmp_path / "pc", {0: (5, MAX_RANGE)})
    real_read_text = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):  # the kernel's root-only energy_uj (CVE-2020-8694)
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    with pytest.raises(EnergyMeterError, match=r"not readable.*CVE-2020-8694"):
        RaplMeter(root, poll_seconds=None)


# ---------------------------------------------------------------- automatic choice
def test_auto_meter_picks_what_works(tmp_path, monkeypatch):
    monkeypatch.delenv(ENERGY_METERS_ENV, raising=False)
    root = fake_powercap(tmp_path, {0: (0, MAX_RANGE)})
    nvml = FakeNVML.with_gpus(2)

    # A CPU trial: RAPL only, even with GPUs on the node.
    with auto_meter([], nvml=nvml, powercap_root=root, poll_seconds=None) as meter:
        assert isinstance(meter, RaplMeter)

    # A GPU trial: its GPU and the CPU packages, summed.
    with auto_meter(["1"], nvml=nvml, powercap_root=root, poll_seconds=None) as meter:
        assert isinstance(meter, CompositeMeter) and meter.source == "nvml+rapl"
        span = meter.begin()
        nvml.spend(1, 3_000)
        set_uj(root, 0, 1_000_000)
        reading = span.read()
        assert reading.joules == pytest.approx(4.0) and reading.shared  # RAPL is shared

    # Nothing available: a NoMeter that says why.
    nvml.fail_init = True
    meter = auto_meter(["0"], nvml=nvml, powercap_root=tmp_path / "none", poll_seconds=None)
    assert isinstance(meter, NoMeter)
    assert set(meter.reasons) == {"nvml", "rapl"} and "could not start" in meter.reasons["nvml"]


def test_auto_meter_kinds_and_environment(tmp_path, monkeypatch):
    root = fake_powercap(tmp_path, {0: (0, MAX_RANGE)})
    monkeypatch.setenv(ENERGY_METERS_ENV, "none")
    assert isinstance(auto_meter([], powercap_root=root), NoMeter)
    monkeypatch.setenv(ENERGY_METERS_ENV, "rapl")
    with auto_meter(["0"], powercap_root=root, poll_seconds=None) as meter:
        assert isinstance(meter, RaplMeter)  # GPUs not asked for
    # A meter asked for by name must be there.
    with pytest.raises(EnergyMeterError, match="'nvml' is unavailable"):
        auto_meter(["0"], kinds="nvml", nvml=FakeNVML(fail_init=True))
    with pytest.raises(EnergyMeterError, match="unknown"):
        auto_meter([], kinds="joulemeter")


def test_visible_gpu_ids(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_ids() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-abc")
    assert visible_gpu_ids() == ["2", "GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_ids() == []
