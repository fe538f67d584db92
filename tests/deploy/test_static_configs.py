"""Static checks of the deployment files (cluster/, docker/): no cluster, no network.

Each checker is also run on a small bad example, so that a checker that
accepts everything fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
AWS_CONFIG = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay.yaml"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu")

AWS_KEY_PATTERNS = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    # A secret access key is 40 characters of base64; `KEY=...` placeholders pass.
    re.compile(r"aws_secret_access_key[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9/+]{30,}", re.IGNORECASE),
)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY", re.IGNORECASE)
EXACT_TAG = re.compile(r"^[0-9]+(\.[0-9]+)+([-.][A-Za-z0-9.]+)*$")


# -- checkers ---------------------------------------------------------------


def ray_cluster_schema() -> dict[str, Any]:
    """Ray's own cluster-launcher schema, from the installed ray package."""
    text = resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text()
    return json.loads(text)


def image_tag_problem(image: str) -> str | None:
    """Why ``image`` is not pinned to an exact version tag, or None."""
    if "@sha256:" in image:
        return None
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"{image}: no tag (means latest)"
    tag = name.split(":", 1)[1]
    if tag == "latest" or not EXACT_TAG.match(tag):
        return f"{image}: tag {tag!r} is not an exact version"
    return None


def aws_config_problems(config: dict[str, Any]) -> list[str]:
    """Project rules for a `ray up` config beyond Ray's schema."""
    problems = []
    head = config.get("head_node_type")
    node_types = config.get("available_node_types", {})
    workers = {name: t for name, t in node_types.items() if name != head}
    if head not in node_types:
        problems.append(f"head_node_type {head!r} is not in available_node_types")
    if not workers:
        problems.append("no worker node type")
    for name, node_type in workers.items():
        if node_type.get("resources", {}).get("GPU", 0) < 1:
            problems.append(f"worker type {name} declares no GPU in resources")
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"worker type {name}: min_workers is not 0")
        if node_type.get("max_workers", 0) < 1:
            problems.append(f"worker type {name}: max_workers < 1")
    docker = config.get("docker")
    if not docker:
        problems.append("no docker section")
    else:
        for key in ("image", "head_image", "worker_image"):
            if key in docker and (why := image_tag_problem(docker[key])):
                problems.append(f"docker.{key}: {why}")
        options = " ".join(docker.get("run_options", []))
        if "--shm-size" not in options:
            problems.append("docker.run_options sets no --shm-size")
        if "RAY_AUTH_MODE=token" not in options:
            problems.append("token authentication is not switched on (RAY_AUTH_MODE=token)")
    start = " ".join(config.get("head_start_ray_commands", []))
    if "--object-store-memory" not in start:
        problems.append("head start command sets no --object-store-memory")
    host = re.search(r"--dashboard-host[= ]+(\S+)", start)
    if host is None or host.group(1) not in ("127.0.0.1", "localhost", "::1"):
        problems.append("the dashboard is not bound to localhost")
    return problems


def text_problems(text: str, where: str) -> list[str]:
    """Credentials and disabled authentication, in any text file."""
    problems = [f"{where}: AWS key pattern" for p in AWS_KEY_PATTERNS if p.search(text)]
    if re.search(r"RAY_AUTH_MODE\W{0,3}(value\W{0,3})?disabled", text, re.IGNORECASE):
        problems.append(f"{where}: RAY_AUTH_MODE=disabled")
    if re.search(r"dashboard-host\W{0,3}0\.0\.0\.0", text) and where.endswith("aws-gpu.yaml"):
        problems.append(f"{where}: dashboard bound to 0.0.0.0")
    return problems


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template.get("spec", {}).get("containers", [])


def _env_problems(container: dict[str, Any], where: str) -> list[str]:
    problems = []
    for env in container.get("env", []):
        if SECRET_NAME.search(env.get("name", "")) and "value" in env:
            problems.append(f"{where}: {env['name']} has a literal value, not a secretKeyRef")
    return problems


def _uses_secret_for_s3(container: dict[str, Any]) -> bool:
    if any("secretRef" in source for source in container.get("envFrom", [])):
        return True
    return any(
        env.get("name") == "AWS_SECRET_ACCESS_KEY" and "secretKeyRef" in env.get("valueFrom", {})
        for env in container.get("env", [])
    )


def kuberay_problems(documents: list[dict[str, Any]]) -> list[str]:
    """What a RayCluster (and a RayJob running `eeipu-ray run`) is missing."""
    problems = []
    clusters = [d for d in documents if d and d.get("kind") == "RayCluster"]
    jobs = [d for d in documents if d and d.get("kind") == "RayJob"]
    if len(clusters) != 1:
        return [f"expected one RayCluster, found {len(clusters)}"]
    cluster = clusters[0]
    if cluster.get("apiVersion") != "ray.io/v1":
        problems.append(f"RayCluster apiVersion {cluster.get('apiVersion')!r} is not ray.io/v1")
    spec = cluster.get("spec", {})
    head = spec.get("headGroupSpec", {})
    if "rayStartParams" not in head:
        problems.append("headGroupSpec has no rayStartParams")
    head_containers = _containers(head.get("template", {}))
    if not head_containers or not head_containers[0].get("image"):
        problems.append("head container has no image")
    pods = [("head", c) for c in head_containers]
    groups = spec.get("workerGroupSpecs", [])
    if not groups:
        problems.append("no workerGroupSpecs")
    has_gpu = False
    for group in groups:
        name = group.get("groupName", "?")
        for key in ("groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"):
            if key not in group:
                problems.append(f"worker group {name}: no {key}")
        if group.get("minReplicas") != 0:
            problems.append(f"worker group {name}: minReplicas is not 0")
        for container in _containers(group.get("template", {})):
            pods.append((name, container))
            limits = container.get("resources", {}).get("limits", {})
            has_gpu = has_gpu or int(limits.get("nvidia.com/gpu", 0)) > 0
    if not has_gpu:
        problems.append("no worker container with nvidia.com/gpu in resources.limits")
    for where, container in pods:
        if (why := image_tag_problem(container.get("image", ""))) is not None:
            problems.append(f"{where}: {why}")
        problems += _env_problems(container, where)
        if not _uses_secret_for_s3(container):
            problems.append(f"{where}: S3 credentials do not come from a Secret")
    if len(jobs) != 1:
        problems.append(f"expected one RayJob, found {len(jobs)}")
    else:
        job = jobs[0]
        if job.get("apiVersion") != "ray.io/v1":
            problems.append("RayJob apiVersion is not ray.io/v1")
        argv = shlex.split(job.get("spec", {}).get("entrypoint", ""))
        if argv[:2] != ["eeipu-ray", "run"]:
            problems.append("RayJob entrypoint does not run `eeipu-ray run`")
        for container in _containers(job["spec"].get("submitterPodTemplate", {})):
            problems += _env_problems(container, "RayJob submitter")
    return problems


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            instruction, _, arguments = full.partition(" ")
            yield instruction.upper(), arguments.strip()
    if pending.strip():
        instruction, _, arguments = pending.strip().partition(" ")
        yield instruction.upper(), arguments.strip()


def _assignments(arguments: str) -> dict[str, str | None]:
    """Names and values of an ENV/ARG line (``K=V K2=V2``, ``K V`` or bare ``K``)."""
    parts = shlex.split(arguments)
    if len(parts) >= 2 and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}  # legacy `ENV KEY value`
    return {
        name: (value if sep else None)
        for name, sep, value in (part.partition("=") for part in parts)
    }


TORCH_REQUIREMENT = re.compile(r"^torch([=<>~!].*)?$")
PACKAGE_REQUIREMENT = re.compile(r"^(\.|eeipu-ray|eeipu_ray)(\[[^\]]*\])?([=<>~!].*)?$")
CONSTRAINTS = "requirements/constraints.txt"


def _pip_installs(shell: str) -> list[list[str]]:
    """The arguments after `pip install` of each command of a RUN line."""
    commands = []
    for command in re.split(r"&&|\|\||;", shell):
        try:
            argv = shlex.split(command)
        except ValueError:
            continue
        for i in range(len(argv) - 1):
            if argv[i] == "pip" and argv[i + 1] == "install":
                commands.append(argv[i + 2 :])
                break
    return commands


def _constrained(arguments: list[str]) -> bool:
    pairs = zip(arguments, [*arguments[1:], ""], strict=True)
    return any(
        (flag in ("-c", "--constraint") and value == CONSTRAINTS)
        or flag == f"--constraint={CONSTRAINTS}"
        for flag, value in pairs
    )


def dockerfile_problems(text: str) -> list[str]:
    """Project rules for a Dockerfile."""
    problems = []
    instructions = list(dockerfile_instructions(text))
    stage_names: set[str] = set()
    torch_at = package_at = user_at = None
    user = None
    for index, (instruction, arguments) in enumerate(instructions):
        if instruction == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--")]
            image = words[0] if words else ""
            if image not in stage_names and (why := image_tag_problem(image)):
                problems.append(f"FROM {why}")
            if len(words) == 3 and words[1].lower() == "as":
                stage_names.add(words[2])
        elif instruction == "RUN":
            for command in _pip_installs(arguments):
                if any(TORCH_REQUIREMENT.match(arg) for arg in command) and torch_at is None:
                    torch_at = index
                if any(PACKAGE_REQUIREMENT.match(arg) for arg in command):
                    if not _constrained(command):
                        problems.append("the package is installed without the constraints file")
                    package_at = index if package_at is None else package_at
        elif instruction == "USER":
            user, user_at = arguments.split(":")[0].strip(), index
        elif instruction in ("ENV", "ARG"):
            for name, value in _assignments(arguments).items():
                if SECRET_NAME.search(name) and value:
                    problems.append(f"{instruction} {name} holds a value (a secret in the image)")
    if torch_at is None:
        problems.append("torch is not installed")
    if package_at is None:
        problems.append("the package is not installed (pip install . / eeipu-ray)")
    if torch_at is not None and package_at is not None and torch_at > package_at:
        problems.append("torch is installed after the package")
    if user is None or user in ("root", "0"):
        problems.append("no non-root USER")
    last_command = max(
        (i for i, (ins, _) in enumerate(instructions) if ins in ("CMD", "ENTRYPOINT")),
        default=None,
    )
    if user_at is not None and last_command is not None and user_at > last_command:
        problems.append("USER comes after CMD/ENTRYPOINT")
    if "HF_HUB_OFFLINE=1" not in text:
        problems.append("HF_HUB_OFFLINE=1 is not set")
    return problems


# -- the real files -----------------------------------------------------------


def test_aws_config_validates_against_ray_schema():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    jsonschema.validate(config, ray_cluster_schema())


def test_aws_config_follows_project_rules():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    assert aws_config_problems(config) == []


def test_no_credentials_or_disabled_auth_in_deployment_files():
    files = [p for d in (CLUSTER, DOCKER) for p in sorted(d.rglob("*")) if p.is_file()]
    files.append(ROOT / ".dockerignore")
    assert len(files) >= 5
    problems = [q for p in files for q in text_problems(p.read_text(), str(p))]
    assert problems == []


def test_kuberay_manifest_has_what_a_raycluster_and_rayjob_need():
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert kuberay_problems(documents) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_follows_project_rules(path):
    assert dockerfile_problems(path.read_text()) == []


def test_dockerignore_keeps_local_state_out_of_the_build():
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "results", ".eeipu-cache"} <= entries


# -- the checkers reject bad examples ----------------------------------------


def test_schema_rejects_a_typo_in_a_cluster_config():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    config["head_start_ray_comands"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


def test_project_rules_reject_a_bad_cluster_config():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    config["docker"]["image"] = "rayproject/ray:latest"
    config["docker"]["run_options"] = ["--env RAY_AUTH_MODE=disabled"]
    config["available_node_types"]["gpu_1x"]["resources"] = {"CPU": 4}
    config["available_node_types"]["gpu_1x"]["min_workers"] = 1
    config["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    problems = "\n".join(aws_config_problems(config))
    for expected in ("docker.image", "--shm-size", "RAY_AUTH_MODE", "no GPU", "min_workers"):
        assert expected in problems
    assert "not bound to localhost" in problems
    assert "--object-store-memory" in problems


def test_text_check_finds_keys_and_disabled_auth():
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"  # split so this file passes its own scan
    bad = f"aws_access_key_id = {fake_key}\nRAY_AUTH_MODE=disabled\n"
    problems = text_problems(bad, "x.yaml")
    assert len(problems) == 2
    assert text_problems("- name: RAY_AUTH_MODE\n  value: disabled\n", "k.yaml")
    assert text_problems("ray start --dashboard-host=0.0.0.0", "cluster/aws-gpu.yaml")


def test_kuberay_check_rejects_literal_credentials_and_missing_gpu():
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"].pop("nvidia.com/gpu")
    worker["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"}]
    documents = [d for d in documents if d["kind"] != "RayJob"]
    problems = "\n".join(kuberay_problems(documents))
    assert "nvidia.com/gpu" in problems
    assert "literal value" in problems
    assert "not come from a Secret" in problems
    assert "RayJob" in problems


BAD_DOCKERFILE = """\
FROM python:latest
ENV AWS_SECRET_ACCESS_KEY=abc \\
    HOME=/root
ARG GITHUB_TOKEN=ghp_x
RUN pip install . \\
    && pip install torch
CMD ["eeipu-ray"]
"""


def test_dockerfile_check_rejects_a_bad_example():
    problems = "\n".join(dockerfile_problems(BAD_DOCKERFILE))
    for expected in (
        "latest",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_TOKEN",
        "constraints",
        "non-root USER",
        "HF_HUB_OFFLINE",
    ):
        assert expected in problems
    assert "FROM" in dockerfile_problems("FROM python\nUSER 1000\n")[0]
    late_user = "FROM python:3.11.7-slim\nCMD x\nUSER 1000\n"
    assert "USER comes after CMD/ENTRYPOINT" in dockerfile_problems(late_user)
    root_user = "FROM python:3.11.7-slim\nUSER root\nCMD x\n"
    assert "no non-root USER" in dockerfile_problems(root_user)


def test_dockerfile_check_orders_torch_before_the_package():
    text = (
        "FROM python:3.11.7-slim\nENV HF_HUB_OFFLINE=1\nUSER 1000\n"
        'RUN pip install -c requirements/constraints.txt ".[t5]"\n'
        'RUN pip install "torch==2.13.0"\nCMD x\n'
    )
    assert dockerfile_problems(text) == ["torch is installed after the package"]


def test_dockerfile_parser_joins_continuations():
    text = "FROM a:1.0\n# c\nRUN echo 1 \\\n    # inner\n    && echo 2\nUSER 1000\n"
    assert list(dockerfile_instructions(text)) == [
        ("FROM", "a:1.0"),
        ("RUN", "echo 1 && echo 2"),
        ("USER", "1000"),
    ]
