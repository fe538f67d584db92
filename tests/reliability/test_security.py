"""Security: a shared cache cannot be turned against the people who use it.

* pickle stays opt-in, up to the pipeline: a planted pickled entry is never
  unpickled by a cache that did not opt in, and the stage recomputes;
* hyperparameter values cannot steer a path outside the cache root: hostile
  strings run through a real pipeline on a real local cache, and the temporary
  directory is listed afterwards;
* checksums reject tampered entries: a flipped byte is a miss and the trial
  recomputes the right answer;
* S3 credentials never appear in logs, results, reports or checkpoints: a real
  Ray Tune sweep on the loopback moto server, with distinctive secrets, and
  every byte it wrote is searched;
* cluster configs keep Ray's token authentication on, on every node and pod.

What ``tests/cache`` already proves (codec-level pickle refusal, key checks,
secrets in ``repr``/log lines of one cache) is not repeated here.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import EntryMeta, PrefixCache
from eeipu_ray.errors import CacheIntegrityError, CodecError, EEIPUError
from eeipu_ray.search import EngineOptions
from eeipu_ray.tune.searcher import EEIPUSearcher
from tests.cache.test_prefix_cache import entry_for
from tests.tune.toy_pipeline import make_pipeline, tune_run_config, unique_name

ROOT = Path(__file__).resolve().parents[2]


def run(pipeline: Pipeline, config: Mapping[str, Any], cache: PrefixCache, trial: Path) -> Any:
    return pipeline.run(config, cache, trial_dir=trial, meter=None)


# ====================================================================== pickle
UNPICKLED: list[str] = []


class Planted:
    """What an attacker with write access to a shared cache would store: an
    object whose unpickling runs code (here it only records that it ran)."""

    def __init__(self, note: str) -> None:
        self.note = note

    def __setstate__(self, state: dict[str, Any]) -> None:
        UNPICKLED.append(state["note"])
        self.__dict__.update(state)


def two_stage(calls: list[str], output: Any = None) -> Pipeline:
    def prep(_: Any, p: Mapping[str, Any]) -> Any:
        calls.append("prep")
        return output if output is not None else np.arange(int(p["n"]), dtype=np.float64)

    def train(data: Any, p: Mapping[str, Any]) -> dict[str, float]:
        calls.append("train")
        return {"score": float(np.sum(data)) * float(p["lr"])}

    return Pipeline(
        "sec",
        [
            Stage("prep", prep, {"n": tune.randint(1, 50), "tag": "default"}),
            Stage("train", train, {"lr": tune.uniform(0.0, 1.0)}),
        ],
    )


CONFIG = {"prep": {"n": 10}, "train": {"lr": 0.5}}


def test_a_stage_output_only_pickle_could_store_fails_loudly_without_opt_in(
    tmp_path: Path,
) -> None:
    calls: list[str] = []
    pipeline = two_stage(calls, output=Planted("own output"))
    cache = PrefixCache(tmp_path / "cache")
    with pytest.raises(CodecError) as info:
        run(pipeline, CONFIG, cache, tmp_path / "trial")
    assert "'prep'" in str(info.value) and "allow_pickle" in str(info.value)
    assert cache.entries() == []  # nothing half-written


def test_a_planted_pickled_entry_is_never_unpickled_and_the_stage_recomputes(
    tmp_path: Path,
) -> None:
    """Someone who can write the shared cache plants a pickled entry under the
    exact key of a real prefix; a pipeline whose cache did not opt in to pickle
    treats it as a miss (no code runs), recomputes the stage, and leaves the
    planted entry for an operator to find."""
    calls: list[str] = []
    pipeline = two_stage(calls)
    prefix_key = pipeline.prefix_keys(CONFIG)[0]
    meta = EntryMeta(
        pipeline="sec",
        stage_names=["prep"],
        stage_versions=["1"],
        params=[pipeline.nest_config(CONFIG)["prep"]],
        compute_seconds=[1.0],
    )
    attacker = PrefixCache(tmp_path / "cache", allow_pickle=True)
    assert attacker.store(prefix_key, Planted("pwned"), meta).published
    UNPICKLED.clear()

    strict = PrefixCache(tmp_path / "cache")
    result = run(pipeline, CONFIG, strict, tmp_path / "trial").to_result("score")
    assert UNPICKLED == []
    assert result["memoized_stages"] == 0 and calls == ["prep", "train"]
    assert result["score"] == pytest.approx(45 * 0.5)
    assert strict.contains(prefix_key)  # left in place, not silently replaced

    # Shipped to a trial (pickled, as Tune does), the cache still refuses pickle.
    shipped = pickle.loads(pickle.dumps(strict))
    assert not shipped.allow_pickle and shipped.load(prefix_key) is None
    assert UNPICKLED == []


# ====================================================== paths outside the root
HOSTILE_STRINGS = st.one_of(
    st.sampled_from(
        [
            "../outside",
            "../../outside/x",
            "..",
            "/",
            "~/outside",
            "..\\..\\outside",
            "a/../../outside",
            "%2e%2e/outside",
            "..\u2215outside",  # DIVISION SLASH
            "\u202e../outside",  # RIGHT-TO-LEFT OVERRIDE
            "con",
            "a\x00../outside",
        ]
    ),
    st.lists(st.sampled_from(["..", "/", "\\", "\x00", "~", ".", "a", "é", "\n"]), max_size=10).map(
        "".join
    ),
)


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")}


@settings(
    max_examples=20,
    derandomize=True,  # the same examples on every run: CI is reproducible
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(hostile=HOSTILE_STRINGS, absolute=st.booleans())
def test_hostile_hyperparameters_never_create_a_file_outside_the_cache_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: str, absolute: bool
) -> None:
    """Hostile strings as a hyperparameter value, as a key of the stage's output
    and as part of the stored value, through a real pipeline run (store, then
    load into a restore directory): every file created lies in the cache root or
    the trial's directory, none in the working directory or beside them."""
    box = tmp_path / uuid.uuid4().hex[:8]
    (box / "cwd").mkdir(parents=True)
    monkeypatch.chdir(box / "cwd")
    value = str(box / "outside" / hostile) if absolute else hostile

    def prep(_: Any, p: Mapping[str, Any]) -> Any:
        return {"data": np.arange(3.0), "names": [p["tag"]], "by_tag": {p["tag"]: 1}}

    def train(data: Any, p: Mapping[str, Any]) -> dict[str, float]:
        return {"score": float(np.sum(data["data"])) + len(data["names"][0]) * p["lr"]}

    pipeline = Pipeline(
        "hostile",
        [
            Stage("prep", prep, {"tag": "x"}),
            Stage("train", train, {"lr": tune.uniform(0.0, 1.0)}),
        ],
    )
    cache = PrefixCache(box / "cache")
    config = {"prep": {"tag": value}, "train": {"lr": 0.25}}
    before = _files(box)
    outcomes = []
    for attempt in ("store", "load"):
        try:
            out = run(pipeline, config, cache, box / f"trial-{attempt}")
            outcomes.append(out.to_result("score"))
        except EEIPUError as exc:  # refused (e.g. a dict key a codec cannot name): fine
            outcomes.append(type(exc).__name__)
    created = _files(box) - before
    allowed = (box / "cache", box / "trial-store", box / "trial-load")
    stray = [p for p in created if not any(p.is_relative_to(a) for a in allowed)]
    assert stray == [], stray
    assert not (box / "outside").exists() and list((box / "cwd").iterdir()) == []
    if isinstance(outcomes[1], dict):  # the second run loaded the first one's prefix
        assert outcomes[1]["memoized_stages"] == 1
        assert outcomes[1]["score"] == outcomes[0]["score"]


# =================================================================== checksums
def test_a_flipped_byte_is_a_miss_and_the_trial_recomputes_the_right_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    pipeline = two_stage(calls)
    cache = PrefixCache(tmp_path / "cache")
    first = run(pipeline, CONFIG, cache, tmp_path / "t1").to_result("score")
    key = pipeline.prefix_keys(CONFIG)[0]
    manifest = cache.manifest(key)
    assert manifest is not None
    data = next(
        p
        for p in (tmp_path / "cache" / "entries" / key / manifest.data_dir).rglob("*")
        if p.is_file() and p.stat().st_size > 0
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, size unchanged: only the checksum can tell
    data.write_bytes(bytes(raw))

    with pytest.raises(CacheIntegrityError):
        cache.verify(key)
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="eeipu_ray.cache"):
        second = run(pipeline, CONFIG, cache, tmp_path / "t2").to_result("score")
    assert second["memoized_stages"] == 0 and calls == ["prep", "train"]
    assert second["score"] == first["score"] == pytest.approx(45 * 0.5)
    assert any(key[:12] in r.getMessage() for r in caplog.records), caplog.text
    cache.verify(key)  # the recomputed entry replaced the tampered one
    calls.clear()
    third = run(pipeline, CONFIG, cache, tmp_path / "t3").to_result("score")
    assert third["memoized_stages"] == 1 and calls == ["train"]
    assert third["score"] == first["score"]


# ================================================================ credentials
ACCESS_KEY = "AKIAEEIPULEAKCHECK7F3A"
SECRET_KEY = "eeipu-Secret/9c1d+Do-Not-Log-4b2e"
SECRETS = (ACCESS_KEY.encode(), SECRET_KEY.encode())


def _leaks(path: Path) -> list[str]:
    """Files under ``path`` that hold a secret (as bytes: pickles and logs too)."""
    found = []
    for file in path.rglob("*"):
        if not file.is_file() or file.is_symlink():
            continue
        try:
            body = file.read_bytes()
        except OSError:
            continue  # sockets and files that vanished while Ray ran
        found += [f"{file} holds {s.decode()!r}" for s in SECRETS if s in body]
    return found


def _in_text(text: str) -> list[str]:
    return [s.decode() for s in SECRETS if s.decode() in text]


@pytest.fixture
def secret_bucket(s3_server: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A bucket on the loopback S3 server, and storage options holding distinctive
    credentials (moto accepts any)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    name = f"eeipu-sec-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    options = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "endpoint_url": s3_server["endpoint_url"],
        "client_kwargs": {"region_name": "us-east-1"},
    }
    yield f"s3://{name}", options


@pytest.mark.slow
def test_s3_credentials_appear_in_no_log_result_report_or_checkpoint(
    ray_local: Any,
    tmp_path: Path,
    secret_bucket: tuple[str, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from eeipu_ray.report import write_report

    bucket, options = secret_bucket
    caplog.set_level(logging.DEBUG)  # every logger: botocore, s3fs, Ray, ours
    pipeline = make_pipeline(unique_name("sec"), sleep_s=0.05)
    cache = PrefixCache(f"{bucket}/sweep", storage_options=options, touch_interval=0)
    searcher = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        cache=cache,
        max_concurrent=1,
        options=replace(
            EngineOptions(num_restarts=2, raw_samples=32, mc_samples=32, maxiter=10), n_warmup=3
        ),
    )
    storage = tmp_path / "storage"
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=5, reuse_actors=True),
        run_config=tune_run_config(storage, "secrets"),
    ).fit()
    assert not grid.errors, grid.errors
    results = [dict(r.metrics) for r in grid]
    assert len(results) == 5 and any(r["memoized_stages"] > 0 for r in results)
    assert cache.entries(), "the sweep must have written the S3 cache"

    # Results, and the searcher's own checkpoint and pickled form.
    assert _in_text(repr(results)) == []
    assert _in_text(grid.get_dataframe().to_csv()) == []
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))
    assert _leaks(tmp_path / "searcher.pkl") == []
    restored = EEIPUSearcher(
        pipeline, metric="score", mode="max", cache=cache, options=EngineOptions(n_warmup=3)
    )
    restored.restore(str(checkpoint))
    assert restored.budget_spent == searcher.budget_spent

    # Reports of the experiment directory.
    experiment_dir = storage / "secrets"
    report = write_report(experiment_dir, out_dir=tmp_path / "report", metric="score")
    assert _leaks(tmp_path / "report") == [] and report.html.exists()

    # Logs: captured logging, and every log file of this Ray session.
    assert SECRET_KEY not in caplog.text  # at every level, every logger
    # The access key id (an identifier, not a secret, for AWS) is in botocore's
    # own DEBUG dump of each request's Authorization header; nowhere else.
    holding = [r for r in caplog.records if ACCESS_KEY in r.getMessage()]
    assert all(r.levelno <= logging.DEBUG and r.name.startswith("botocore") for r in holding), [
        (r.name, r.levelname) for r in holding if not r.name.startswith("botocore")
    ]
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert (session / "logs").is_dir()
    assert _leaks(session / "logs") == []

    # Everything Tune wrote under its storage path: results, trial dirs, the
    # experiment state, the searcher checkpoint Tune keeps, and tuner.pkl (its
    # pickle of the trainable and the searcher, which both hold the cache).
    assert (experiment_dir / "tuner.pkl").is_file()
    assert _leaks(storage) == []


def test_the_pickled_trainable_carries_no_credentials(
    secret_bucket: tuple[str, dict[str, Any]],
) -> None:
    """What Tune writes into ``<experiment>/tuner.pkl``: the trainable and the
    searcher, cloudpickled (both hold the cache)."""
    from ray import cloudpickle

    bucket, options = secret_bucket
    cache = PrefixCache(f"{bucket}/sweep", storage_options=options)
    trainable = make_pipeline(unique_name("sec")).as_trainable(cache=cache, metric="score")
    pipeline = make_pipeline(unique_name("sec"))
    searcher = EEIPUSearcher(pipeline, metric="score", mode="max", cache=cache)
    for shipped in (cloudpickle.dumps(trainable), cloudpickle.dumps(searcher)):
        assert [s for s in SECRETS if s in shipped] == []
    # In this process an unpickled copy finds them again (Tune deep-copies).
    unpickled = pickle.loads(pickle.dumps(cache))
    assert unpickled.durable._options()["secret"] == SECRET_KEY


@pytest.mark.slow
def test_credentials_reach_ray_workers_without_a_pickle(
    ray_local: Any, secret_bucket: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A cache pickled on the driver stores and loads from a Ray worker with the
    credentials it was given (from the cluster's internal key-value store); a
    process outside the cluster gets no secret from the pickle, and says so."""
    bucket, options = secret_bucket
    cache = PrefixCache(f"{bucket}/workers", storage_options=options)
    shipped = pickle.dumps(cache)
    assert [s for s in SECRETS if s in shipped] == []

    @ray_local.remote(num_cpus=0)
    def store_in_a_worker(blob: bytes) -> tuple[bool, int]:
        remote = pickle.loads(blob)
        key, meta = entry_for()
        remote.store(key, np.arange(4.0), meta)
        return remote.durable._options().get("secret") == SECRET_KEY, os.getpid()

    has_secret, pid = ray_local.get(store_in_a_worker.remote(shipped))
    assert has_secret and pid != os.getpid()
    key, _ = entry_for()
    cache.verify(key)  # the worker's write, with its credentials, reached the bucket

    # Outside the cluster (a fresh Python, no Ray): no secret, a warning naming the cache.
    blob = tmp_path / "cache.pkl"
    blob.write_bytes(shipped)
    probe = (
        "import logging, pickle, sys; logging.basicConfig(level=logging.WARNING);"
        f"c = pickle.loads(open({str(blob)!r}, 'rb').read());"
        "o = c.durable._options(); sys.exit(3 if 'secret' in o else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    assert done.returncode == 0, done.stderr
    assert "not available in this process" in done.stderr and bucket in done.stderr
    assert SECRET_KEY not in done.stderr


# ============================================================ cluster configs
AWS_CONFIG = ROOT / "cluster" / "aws-gpu.yaml"
KUBERAY = ROOT / "cluster" / "kuberay.yaml"


def aws_auth_problems(config: Mapping[str, Any]) -> list[str]:
    """Token authentication on every node of a `ray up` config, with the token
    mounted from the user's machine (never written into the config)."""
    problems = []
    docker = config.get("docker", {})
    for field in ("head_run_options", "worker_run_options"):
        # Node-type options are added to run_options: none may switch auth off.
        if any("RAY_AUTH_MODE" in o and "token" not in o for o in docker.get(field, [])):
            problems.append(f"docker.{field} changes RAY_AUTH_MODE")
    options = docker.get("run_options", [])
    if not any(o.replace(" ", "") == "--envRAY_AUTH_MODE=token" for o in options):
        problems.append("docker.run_options does not set RAY_AUTH_MODE=token for every node")
    paths = [o.split("=", 1)[1] for o in options if "RAY_AUTH_TOKEN_PATH=" in o]
    mounts = config.get("file_mounts", {})
    if len(paths) != 1:
        problems.append("docker.run_options sets no RAY_AUTH_TOKEN_PATH")
    elif paths[0] not in mounts:
        problems.append(f"the token file {paths[0]} is not a file_mount")
    elif not str(mounts[paths[0]]).startswith(("~", "/")):
        problems.append("the token file_mount is not a path on the user's machine")
    elif not any(f"chmod 600 {paths[0]}" in c for c in config.get("setup_commands", [])):
        problems.append("the token file is not made private (chmod 600)")
    for node in config.get("available_node_types", {}).values():
        if "RAY_AUTH_MODE" in str(node):
            problems.append("a node type overrides RAY_AUTH_MODE")
    commands = " ".join(
        config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    )
    if "RAY_AUTH_MODE=" in commands and "RAY_AUTH_MODE=token" not in commands:
        problems.append("a start command changes RAY_AUTH_MODE")
    return problems


def kuberay_auth_problems(documents: list[Mapping[str, Any]]) -> list[str]:
    """RAY_AUTH_MODE=token and the token from a Secret in every Ray container:
    the head, every worker group and the RayJob submitter."""
    containers: list[tuple[str, Mapping[str, Any]]] = []
    for doc in documents:
        if not doc:
            continue
        spec = doc.get("spec", {})
        if doc.get("kind") == "RayCluster":
            head = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {})
            containers += [("head", c) for c in head.get("containers", [])]
            for group in spec.get("workerGroupSpecs", []):
                pod = group.get("template", {}).get("spec", {})
                containers += [(group.get("groupName", "?"), c) for c in pod.get("containers", [])]
        elif doc.get("kind") == "RayJob":
            pod = spec.get("submitterPodTemplate", {}).get("spec", {})
            containers += [("submitter", c) for c in pod.get("containers", [])]
    if not containers:
        return ["no Ray containers found"]
    problems = []
    for where, container in containers:
        env = {e.get("name"): e for e in container.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
        token = env.get("RAY_AUTH_TOKEN", {})
        if "secretKeyRef" not in token.get("valueFrom", {}):
            problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
    return problems


def test_the_ray_up_config_keeps_token_auth_on_for_every_node() -> None:
    assert aws_auth_problems(yaml.safe_load(AWS_CONFIG.read_text())) == []


def test_the_kuberay_manifest_keeps_token_auth_on_in_every_pod() -> None:
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert kuberay_auth_problems(documents) == []


def test_the_auth_checkers_reject_a_node_or_pod_without_token_auth() -> None:
    aws = yaml.safe_load(AWS_CONFIG.read_text())
    bad = copy.deepcopy(aws)
    bad["docker"]["worker_run_options"] = ["--env RAY_AUTH_MODE=disabled"]
    assert "docker.worker_run_options changes RAY_AUTH_MODE" in aws_auth_problems(bad)
    bad = copy.deepcopy(aws)
    bad["file_mounts"] = {}
    assert any("not a file_mount" in p for p in aws_auth_problems(bad))

    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    bad_docs = copy.deepcopy(documents)
    cluster = next(d for d in bad_docs if d and d.get("kind") == "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"] = [e for e in worker["env"] if e.get("name") != "RAY_AUTH_MODE"]
    group = cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    # A new list: the YAML anchor (*ray-env) shares one list among containers.
    assert kuberay_auth_problems(bad_docs) == [f"{group}: RAY_AUTH_MODE is not 'token'"]
