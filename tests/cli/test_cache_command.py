"""``eeipu-ray cache``: a cache that is not there is an error and stays not there;
``gc --max-bytes`` evicts down to exactly the size written, in either unit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eeipu_ray.cache import PrefixCache
from tests.cli.helpers import run_main
from tests.tune.toy_pipeline import make_pipeline


@pytest.mark.parametrize("action", ["ls", "stats", "gc"])
def test_a_missing_cache_is_an_error_and_is_not_created(
    action: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    for url in (str(missing), f"file://{missing}"):
        status, out, err = run_main(["cache", action, url], capsys)
        assert status == 2, (out, err)
        assert f"eeipu-ray cache: error: no cache at {url}: the directory does not exist" in err
    assert not (tmp_path / "no").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a cache")
    status, _, err = run_main(["cache", action, str(a_file)], capsys)
    assert status == 2 and f"no cache at {a_file}: not a directory" in err


def _filled_cache(root: Path) -> PrefixCache:
    """Six entries of ~20 kB each, stored one after the other (distinct last uses)."""
    cache = PrefixCache(root, touch_interval=0)
    pipeline = make_pipeline("cli-cache-sizes", sleep_s=0.0, seeds=range(3))
    for seed in range(3):
        pipeline.run(
            {"data": {"seed": seed}, "features": {"degree": 1}, "fit": {"alpha": 0.1}}, cache
        )
    return cache


def test_gc_max_bytes_means_decimal_or_binary_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = _filled_cache(tmp_path / "cache")
    entries = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
    assert len(entries) == 6
    newest3 = sum(e.bytes for e in entries[:3])
    # A size of m/8 KB and m/8 KiB is a whole number of bytes either way (125m and
    # 128m); pick m so that the three newest entries fit in m/8 KiB, not in m/8 KB.
    m = math.ceil(newest3 / 128)
    assert 125 * m < newest3 <= 128 * m
    kib, kb = f"{m / 8}KiB", f"{m / 8}KB"

    status, out, _ = run_main(["cache", "gc", str(tmp_path / "cache"), "--max-bytes", kib], capsys)
    assert status == 0
    after_kib = json.loads(run_main(["cache", "stats", str(tmp_path / "cache")], capsys)[1])
    # Least recently used first, down to 128m bytes: the three newest stay.
    assert after_kib["bytes"] <= 128 * m and after_kib["entries"] >= 3
    assert f"evicted {6 - after_kib['entries']} entries" in out

    status, out, _ = run_main(["cache", "gc", str(tmp_path / "cache"), "--max-bytes", kb], capsys)
    assert status == 0
    after_kb = json.loads(run_main(["cache", "stats", str(tmp_path / "cache")], capsys)[1])
    # 125m bytes is less: at least one more goes.
    assert after_kb["bytes"] <= 125 * m and after_kb["entries"] < 3
    assert f"evicted {after_kib['entries'] - after_kb['entries']} entries" in out

    # A plain number is bytes.
    status, _, _ = run_main(["cache", "gc", str(tmp_path / "cache"), "--max-bytes", "0"], capsys)
    assert status == 0
    _, out, _ = run_main(["cache", "stats", str(tmp_path / "cache")], capsys)
    assert json.loads(out)["bytes"] == 0
