"""A small 3-stage NumPy pipeline and helpers shared by the Ray Tune tests.

Stages (all real NumPy work, deterministic in their hyperparameters):

1. ``data``: draws a regression problem from ``seed`` after sleeping
   ``sleep_s`` (so that computing it costs a measurable, known time);
   output ``{"X": (n, d) float64, "y": (n,) float64}``.
2. ``features``: polynomial features up to ``degree``, standardized;
   output ``(Phi, y)`` with ``Phi`` of shape ``(n, d * degree)``.
3. ``fit``: closed-form ridge regression with penalty ``alpha`` on the first
   half, ``score`` = minus the validation MSE on the second half.

With ``barrier=(directory, n)``, stage 1 waits until ``n`` trials are inside
it, which forces concurrent trials to race on the same missing prefix: each
looked the prefix up (a miss) before any of them could store it.

When ``record_dir`` is given, every executed stage writes
``<record_dir>/<trial_id>.<stage>.json`` with the Ray node and process it ran
in, so a test can tell where a stage ran (cache entries carry no such thing
back to the trial result).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from eeipu_ray import Pipeline, Stage

STAGES = ("data", "features", "fit")
SLEEP_S = 0.3
N_ROWS = 256
N_COLS = 8


def _record(record_dir: str | None, stage: str) -> None:
    if record_dir is None:
        return
    import ray

    try:
        trial_id = tune.get_context().get_trial_id() or f"local-{uuid.uuid4().hex[:8]}"
    except (RuntimeError, AttributeError):  # outside a Tune trial
        trial_id = f"local-{uuid.uuid4().hex[:8]}"
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    doc = {"trial_id": trial_id, "stage": stage, "node_id": node_id, "pid": os.getpid()}
    path = Path(record_dir, f"{trial_id}.{stage}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _wait_at_barrier(directory: str, count: int, timeout_s: float = 600.0) -> None:
    os.makedirs(directory, exist_ok=True)
    Path(directory, uuid.uuid4().hex).touch()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {count} trials arrived")
        time.sleep(0.02)


def make_pipeline(
    name: str = "toy",
    *,
    sleep_s: float = SLEEP_S,
    record_dir: str | None = None,
    seeds: Iterable[int] = (1, 2),
    degrees: Iterable[int] = (1, 2),
    barrier: tuple[str, int] | None = None,
) -> Pipeline:
    """The toy pipeline; ``name`` should be unique per test so caches never mix."""

    def data(_: Any, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if barrier is not None:
            _wait_at_barrier(*barrier)
        time.sleep(sleep_s)
        _record(record_dir, "data")
        rng = np.random.default_rng(int(params["seed"]))
        X = rng.normal(size=(N_ROWS, N_COLS))
        w = rng.normal(size=N_COLS)
        y = np.sin(X @ w) + 0.05 * rng.normal(size=N_ROWS)
        return {"X": X, "y": y}

    def features(prev: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> tuple:
        _record(record_dir, "features")
        X = np.asarray(prev["X"])
        phi = np.hstack([X**k for k in range(1, int(params["degree"]) + 1)])
        phi = (phi - phi.mean(axis=0)) / phi.std(axis=0)
        return (phi, np.asarray(prev["y"]))

    def fit(prev: tuple, params: Mapping[str, Any]) -> dict[str, float]:
        _record(record_dir, "fit")
        phi, y = prev
        half = len(y) // 2
        a, b = phi[:half], phi[half:]
        w = np.linalg.solve(a.T @ a + float(params["alpha"]) * np.eye(a.shape[1]), a.T @ y[:half])
        return {"score": -float(np.mean((b @ w - y[half:]) ** 2))}

    return Pipeline(
        name,
        [
            Stage("data", data, {"seed": tune.choice(list(seeds))}),
            Stage("features", features, {"degree": tune.choice(list(degrees))}),
            Stage("fit", fit, {"alpha": tune.uniform(0.01, 10.0)}),
        ],
    )


def unique_name(prefix: str) -> str:
    """A pipeline / actor name no other test (or concurrent test run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def nested(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A trial config ``{"data": {...}, ...}`` or flat ``"data/seed"`` as nested dicts."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.setdefault(key, {}).update(value)
        elif "/" in key:
            stage, _, param = key.partition("/")
            out.setdefault(stage, {})[param] = value
    return out


def prefix_of(config: Mapping[str, Any], depth: int) -> tuple:
    """The hyperparameters of stages 1..depth, hashable (which prefix a trial needs)."""
    cfg = nested(config)
    return tuple(tuple(sorted(cfg[s].items())) for s in STAGES[:depth])


def expected_memoized(configs_in_order: list[Mapping[str, Any]]) -> list[int]:
    """For trials run one after another, how many leading stages each finds cached."""
    seen: list[set[tuple]] = [set(), set()]
    expected = []
    for config in configs_in_order:
        depth = 0
        for k in (2, 1):
            if prefix_of(config, k) in seen[k - 1]:
                depth = k
                break
        expected.append(depth)
        for k in (1, 2):
            seen[k - 1].add(prefix_of(config, k))
    return expected


def trial_index(trial_id: str) -> int:
    """Tune trial ids end in a running number (``"ab12c_00003"``): creation order."""
    return int(trial_id.rsplit("_", 1)[-1])


def tune_run_config(storage: Path, name: str) -> Any:
    """A quiet ``tune.RunConfig`` writing under ``storage`` (not ``~/ray_results``)."""
    return tune.RunConfig(
        name=name,
        storage_path=str(storage),
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),
    )
