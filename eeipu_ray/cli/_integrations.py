"""What ``eeipu-ray run`` hands to Ray Tune besides the searcher: the trial
scheduler (``--scheduler``) and the experiment trackers (``--mlflow``, ``--wandb``).

Each option maps to its Tune object here, once; an optional package that is
missing, or a setting Tune would refuse mid-run, is a :class:`UsageError` before
Ray starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

from eeipu_ray import result as R
from eeipu_ray.cli._common import UsageError


def make_scheduler(args: argparse.Namespace) -> Any:
    """The Tune scheduler ``--scheduler`` names; ``None`` for ``fifo`` (Tune's default)."""
    if args.scheduler == "fifo":
        return None
    _check_rungs(args)
    if args.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr=args.time_attr,
            metric=args.metric,
            mode=args.mode,
            max_t=args.max_t,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
        )
    if args.scheduler == "sm2":
        from eeipu_ray.tune.sm2 import SM2Scheduler

        try:
            return SM2Scheduler(
                args.time_attr,
                metric=args.metric,
                mode=args.mode,
                # Energy where it is the cost (and so measured); CPU-seconds, always
                # reported, stand in for it otherwise.
                energy_attr=(
                    R.TOTAL_ENERGY_JOULES if args.cost == "energy" else R.TOTAL_CPU_SECONDS
                ),
                max_t=args.max_t,
                grace_period=args.grace_period,
                reduction_factor=args.reduction_factor,
                energy_weight=args.energy_weight,
            )
        except ValueError as exc:
            raise UsageError(f"--scheduler sm2: {exc}") from exc
    raise UsageError(
        f"--scheduler {args.scheduler!r}: unknown scheduler (choose from fifo, asha, sm2)"
    )


def _check_rungs(args: argparse.Namespace) -> None:
    # ASHA asserts these; say which option is wrong instead.
    if not args.grace_period > 0:
        raise UsageError(f"--grace-period {args.grace_period:g}: must be > 0")
    if not args.max_t >= args.grace_period:
        raise UsageError(
            f"--max-t {args.max_t:g}: must be at least --grace-period ({args.grace_period:g})"
        )
    if not args.reduction_factor > 1:
        raise UsageError(f"--reduction-factor {args.reduction_factor:g}: must be > 1")


def logger_callbacks(args: argparse.Namespace, run_name: str) -> list[Any]:
    """Ray Tune's logger callbacks for ``--mlflow`` and ``--wandb`` (none without them).

    The MLflow experiment is named after the run; W&B groups the run's trials
    under its name.

    Raises:
        UsageError: the tracker's package is not installed, or MLflow cannot
            open the tracking URI.
    """
    callbacks: list[Any] = []
    if args.mlflow:
        callbacks.append(_mlflow_callback(args.mlflow, run_name))
    if args.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise UsageError(
                "--wandb needs the 'wandb' package, which is not installed: pip install wandb "
                "(then wandb login, or set WANDB_API_KEY)"
            )
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=args.wandb, group=run_name))
    return callbacks


def _mlflow_callback(uri: str, run_name: str) -> Any:
    if importlib.util.find_spec("mlflow") is None:
        raise UsageError(
            "--mlflow needs the 'mlflow' package, which is not installed: pip install "
            "mlflow-skinny (or mlflow)"
        )
    uri = _tracking_uri(uri)
    if uri.startswith("file:"):
        # Naming a file store is asking for one: MLflow 3 refuses it unless told so
        # (MLFLOW_ALLOW_FILE_STORE, left as the user set it).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri)  # opens the store: a URI it cannot use fails now
    except (MlflowException, ValueError, OSError) as exc:
        raise UsageError(f"--mlflow {uri}: MLflow cannot use this tracking URI: {exc}") from exc
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=run_name)


def _tracking_uri(uri: str) -> str:
    """A local directory as an absolute ``file://`` URI (so every process means one
    place); any other URI as given."""
    if "://" in uri or uri.startswith(("file:", "databricks", "sqlite:")):
        return uri
    return Path(uri).expanduser().resolve().as_uri()
