"""The core install and its extras: what each needs, and clear errors where one is missing.

The missing packages are simulated in a subprocess by ``sys.modules[name] = None``
(Python then raises ImportError on import), so these tests run in the full test
environment.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("s3fs", "sklearn", "matplotlib", "transformers", "datasets", "accelerate")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    """The installed package's core requirements and those of each extra."""
    core: set[str] = set()
    extras: dict[str, set[str]] = {}
    for requirement in requires("eeipu-ray") or []:
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if extra is None:
            core.add(_name(requirement))
        else:
            spec = requirement.split(";", maxsplit=1)[0].strip()
            extras.setdefault(extra.group(1), set()).add(
                spec.split(">")[0].strip() if spec.lower().startswith("eeipu-ray") else _name(spec)
            )
    return core, extras


def _run(code: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


def test_core_dependencies_leave_the_optional_packages_to_extras() -> None:
    core, extras = _requirements()
    for package in ("s3fs", "scikit-learn", "matplotlib", "transformers", "datasets"):
        assert package not in core, f"{package} is a core dependency"
    assert "s3fs" in extras["s3"]
    assert "scikit-learn" in extras["examples"]
    assert "matplotlib" in extras["report"]
    assert {"transformers", "accelerate", "datasets"} <= extras["hf"]
    assert {"rouge-score", "eeipu-ray[hf]"} <= {e.lower() for e in extras["t5"]}
    # [all] holds every extra a user may want (hf through t5; not the test and docs tooling).
    for extra in ("s3", "examples", "report", "t5", "energy"):
        assert f"eeipu-ray[{extra}]" in {e.lower() for e in extras["all"]}, extra


def test_the_core_runs_a_memoized_pipeline_without_any_optional_package(tmp_path) -> None:
    done = _run(
        f"""
        from eeipu_ray import PrefixCache
        from eeipu_ray.pipelines import load_pipeline
        import eeipu_ray.cli, eeipu_ray.report, eeipu_ray.tune

        pipeline = load_pipeline("synthetic")
        cache = PrefixCache({str(tmp_path / "cache")!r})
        config = {{s.name: {{k: s.space[k].lower for k in s.space}} for s in pipeline.stages}}
        first = pipeline.run(config, cache, meter=None)
        second = pipeline.run(config, cache, meter=None)
        assert second.memoized_stages == len(pipeline.stages) - 1, second.memoized_stages
        print("ok", first.output)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "from eeipu_ray.pipelines import load_pipeline; load_pipeline('stacking')",
            "pipeline 'stacking' needs 'sklearn', which is not installed: "
            "pip install 'eeipu-ray[examples]'",
        ),
        (
            "from eeipu_ray.pipelines import load_pipeline; load_pipeline('t5')",
            "pip install 'eeipu-ray[t5]'",
        ),
        (
            "from eeipu_ray import PrefixCache; PrefixCache('s3://bucket/prefix')",
            "pip install 'eeipu-ray[s3]'",
        ),
        ("import eeipu_ray.hf", "pip install 'eeipu-ray[hf]'"),
    ],
)
def test_a_missing_extra_is_named(code: str, message: str) -> None:
    done = _run(code)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
