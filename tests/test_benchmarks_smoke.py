"""The benchmark scripts still run: each at a tiny size, in a subprocess, end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(script: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{output[-4000:]}"
    return proc.stdout


def test_searcher_overhead_quick(tmp_path: Path) -> None:
    out = tmp_path / "overhead"
    stdout = run_script("searcher_overhead.py", "--quick", "--repeat", "2", "--out", str(out))
    has_optuna = importlib.util.find_spec("optuna") is not None
    header = "| d | n | eeipu (s) | ei (s) |" + (" optuna-gp (s) |" if has_optuna else "")
    assert header in stdout
    if not has_optuna:
        assert "optuna is not installed" in stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"eeipu", "ei", "botorch-ei"} <= methods
    assert ("optuna-gp" in methods) == has_optuna
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in rows)
    assert out.with_suffix(".md").exists()


@pytest.mark.slow
def test_synthetic_sweep_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    stdout = run_script(
        "synthetic_sweep.py",
        *("--seeds", "1", "--methods", "eeipu,ei", "--budget", "15", "--warmup", "3"),
        *("--fast", "--out", str(out)),
    )
    assert "method seed  W trials bo_iters" in stdout
    assert "| method | seeds | BO iters |" in stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["eeipu", "ei"]
    for r in rows:
        assert r["budget_spent"] >= 15.0 and r["failed"] == 0
        assert r["trials"] >= 3 and r["bo_iters"] >= 1
    assert "Per seed:" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_synthetic_sweep_parallel_tiny(tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    stdout = run_script(
        "synthetic_sweep.py",
        *("--workers", "2", "--time-scale", "0.01", "--budget", "8", "--warmup", "3"),
        *("--fast", "--out", str(out)),
    )
    assert "| method | seed | workers | wall s |" in stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert sorted(r["workers"] for r in rows) == [1, 2]
    assert all(r["budget_spent"] >= 8.0 and r["failed"] == 0 for r in rows)
