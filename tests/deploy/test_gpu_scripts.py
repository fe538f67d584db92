"""scripts/gpu: the one-command GPU check and its kit, checked statically.

They run only on a GPU machine (check.sh) or with network access (make_kit.sh),
so here: the shell parses, what check.sh runs exists, and every package the kit
fetches is pinned in requirements/constraints.txt (an unpinned name would make
the kit fail at build time, far from where the pin was dropped)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "scripts" / "gpu"


@pytest.mark.parametrize("script", ["check.sh", "make_kit.sh"])
def test_scripts_parse(script):
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the scripts"
    done = subprocess.run(
        [bash, "-n", str(GPU / script)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_check_runs_tests_and_benchmarks_that_exist():
    text = (GPU / "check.sh").read_text()
    assert (ROOT / "tests" / "gpu" / "test_real_gpu.py").is_file() and "tests/gpu" in text
    for path, name in re.findall(r'"(tests/[\w/]+\.py)::(\w+)"', text):
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name} is not a test"
    for script in re.findall(r"benchmarks/\w+\.py", text):
        assert (ROOT / script).is_file(), script
    # Every option check.sh passes to the recorder is one it takes.
    replay = (ROOT / "benchmarks" / "energy_replay.py").read_text()
    for option in ("--device", "--configs", "--max-seconds", "--out"):
        assert option in text and f'"{option}"' in replay, option


def test_kit_packages_are_pinned():
    text = (GPU / "make_kit.sh").read_text()
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().lower()
    loop = re.search(r"for name in (.*?); do", text, re.S)
    assert loop, "make_kit.sh lists its wheels in a for loop"
    names = ["ray", *loop.group(1).replace("\\", " ").split()]
    assert "pydantic" in names and "jsonschema" in names
    for name in names:
        assert re.search(rf"^{re.escape(name.lower())}==", constraints, re.M), name
