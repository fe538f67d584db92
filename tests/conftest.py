"""Shared fixtures: a real local Ray cluster and a real S3 API on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# Test clusters listen on loopback only; Ray >= 2.59 would otherwise write and
# require an auth token for a local ray.init().
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ray Train's controller polls its workers every 2 s by default: a start and an
# end of a worker group wait for the polls (~5 s per fit on a 2-core machine,
# measured). The tests' stages train for a second; poll sooner.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (a real HTTP S3 API), one per test session.

    Yields a dict with ``endpoint_url`` and ``storage_options`` for fsspec/s3fs.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"key": "testing-access-key", "secret": "testing-secret-key"}
    info = {
        "endpoint_url": endpoint,
        "storage_options": {
            **creds,
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        },
        "env": {
            "AWS_ACCESS_KEY_ID": creds["key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret"],
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    }
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_server: dict[str, Any]) -> Any:
    """A boto3 S3 client of the loopback server (for what s3fs does not expose)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["storage_options"]["key"],
        aws_secret_access_key=s3_server["storage_options"]["secret"],
        region_name="us-east-1",
    )


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh bucket on the loopback S3 server; returns ``s3://<bucket>``."""
    name = f"eeipu-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[Any]:
    """A real single-node local Ray cluster with ``num_cpus`` CPUs, shut down after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _start_local_ray(ray, num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


def _start_local_ray(ray: Any, num_cpus: int) -> None:
    # address="local": a fresh cluster even when another one runs on this machine.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace="eeipu_ray",
        logging_level="WARNING",
        log_to_driver=True,
    )


#: The GCS address of the cluster ``ray_local`` started, while it runs.
_SHARED_RAY: dict[str, str] = {}


def _left_as_found(ray: Any) -> bool:
    """Whether a module left the shared cluster as it found it: no named actor
    (an object-store cache layer, say) and every CPU free again."""
    if ray.util.list_named_actors(all_namespaces=True):
        return False
    total = ray.cluster_resources().get("CPU")
    deadline = time.monotonic() + 10  # Tune's actors free their CPUs shortly after a fit
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") == total:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray cluster with 2 CPUs for a test module.

    Consecutive modules share one (a start and a shutdown cost ~6 s each) while
    each leaves it as it found it; otherwise it is shut down after the module.
    A module that starts a cluster of its own (``local_ray``, ``Cluster``)
    shuts it down first, and the next module here starts a fresh one.
    """
    import ray

    if not (
        ray.is_initialized()
        and _SHARED_RAY.get("address") == ray.get_runtime_context().gcs_address
    ):
        if ray.is_initialized():
            ray.shutdown()
        _start_local_ray(ray, 2)
        _SHARED_RAY["address"] = ray.get_runtime_context().gcs_address
    yield ray
    ours = ray.is_initialized() and (
        _SHARED_RAY.get("address") == ray.get_runtime_context().gcs_address
    )
    if not (ours and _left_as_found(ray)):
        _SHARED_RAY.clear()
        if ray.is_initialized():
            ray.shutdown()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
