"""The README's example, run as written (a smaller budget, a temporary cache and
result directory), in its own process on a local Ray cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 12.0  # seconds of stage time; the README's sweep spends 120


def readme_example() -> str:
    """The first Python block under the README's "## Example" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no Python block under '## Example'"
    return match.group(1)


def test_the_readme_example_runs_and_ends_on_its_budget(tmp_path: Path) -> None:
    code = readme_example()
    edits = {
        'PrefixCache("/tmp/eeipu-cache")': f"PrefixCache({str(tmp_path / 'cache')!r})",
        "budget=120.0": f"budget={BUDGET}",
        "reuse_actors=True))": "reuse_actors=True),\n           run_config=RUN_CONFIG)",
    }
    for old, new in edits.items():
        assert code.count(old) == 1, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    prelude = f"import ray.tune\nRUN_CONFIG = ray.tune.RunConfig(storage_path={str(tmp_path)!r})\n"
    epilogue = textwrap.dedent(
        """
        import json
        records = searcher.engine.records
        print("FACTS " + json.dumps({
            "spent": searcher.budget_spent,
            "trials": len(records),
            "memoized": [r.memoized_stages for r in records if r.finished],
            "entries": len(list(cache.entries())),
        }))
        """
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_AIR_NEW_OUTPUT": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code + epilogue],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FACTS "))
    facts = json.loads(line[len("FACTS ") :])
    # The sweep ended on its budget, not on a trial limit (num_samples=-1).
    assert facts["spent"] >= BUDGET
    # Every trial stored its prefix outputs; the cache holds them.
    assert facts["entries"] >= 1
    assert len(facts["memoized"]) == facts["trials"] >= 2
