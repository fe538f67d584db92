"""The cost-cooling exponent has one home, which loads neither torch nor BoTorch."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import eeipu_ray.cooling
from eeipu_ray.cooling import cost_cooling
from tests.test_report import _result, _tune_dir


def test_the_acquisitions_and_the_search_package_use_the_same_function():
    import eeipu_ray.search
    from eeipu_ray.search import acquisition

    assert acquisition.cost_cooling is cost_cooling
    assert eeipu_ray.search.cost_cooling is cost_cooling


def test_docstring_example():
    assert doctest.testmod(eeipu_ray.cooling).failed == 0


@pytest.mark.parametrize(
    ("budget", "spent", "after", "eta"),
    [
        (None, 5.0, 1.0, 1.0),
        (10.0, 5.0, None, 1.0),
        (10.0, 2.0, 2.0, 1.0),
        (10.0, 6.0, 2.0, 0.5),
        (10.0, 12.0, 2.0, 0.0),
        (10.0, 1.0, 2.0, 1.0),
        (2.0, 3.0, 2.0, 0.0),
        (100.0, 130.0, 20.0, 0.0),
        (100.0, 120.0, 120.0, 0.0),
    ],
)
def test_cost_cooling_values(budget, spent, after, eta):
    assert cost_cooling(budget, spent, after) == pytest.approx(eta)


def test_the_reports_eta_series_loads_neither_torch_nor_botorch(tmp_path: Path):
    root = _tune_dir(tmp_path / "exp", [_result(i, memoized=0) for i in range(6)])
    code = (
        "import sys\n"
        "from eeipu_ray.report import load_experiment\n"
        "from eeipu_ray.report.series import eta_series\n"
        f"experiment = load_experiment({str(root)!r}, budget=40.0, n_warmup=2)\n"
        "series, note = eta_series(experiment)\n"
        "assert series is not None and series.source == 'reconstructed', note\n"
        "assert series.eta[:3] == [1.0, 1.0, 1.0] and series.eta[-1] < 1.0, series.eta\n"
        "assert 'botorch' not in sys.modules, 'botorch imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(series.eta)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
