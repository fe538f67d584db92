"""Racing writers and readers of one prefix key, in separate processes.

Writers are real processes (``multiprocessing`` with the "spawn" context) that
wait on a barrier and then store the same key at once, on a local directory
and on the loopback S3 server. Reader/writer interleavings that processes
cannot hit reliably are forced deterministically in one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eeipu_ray.cache import PrefixCache
from eeipu_ray.cache.fs_store import FsStore
from tests.cache.test_prefix_cache import Backend, _local_backend, _s3_backend, entry_for

VALUE_SIZE = 200_000  # 1.6 MB: writes overlap instead of finishing one by one


def _value() -> np.ndarray:
    return np.linspace(0.0, 1.0, VALUE_SIZE)


def _store_worker(
    url: str, storage_options: dict[str, Any] | None, barrier: Any, results: Any
) -> None:
    """Runs in a spawned process: store entry 0 as soon as every writer is ready.

    Every writer skips the "is it already there?" shortcut, as if all had checked
    at the same instant, so each one writes its data and tries to publish: only
    the atomic publication (``os.link`` / a conditional PUT) can pick the winner.
    """
    try:
        cache = PrefixCache(url, storage_options=storage_options)
        key, meta = entry_for(0)
        cache.contains(key)  # connect before the barrier, so the writes really race
        FsStore.exists = lambda self, key: False  # type: ignore[method-assign]  # this process only
        barrier.wait(timeout=600)
        result = cache.store(key, _value(), meta)
        results.put(("ok", result.published))
    except BaseException as exc:  # report to the parent instead of dying silently
        results.put(("error", repr(exc)))
        raise


def _race(backend: Backend, writers: int) -> list[bool]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_store_worker, args=(backend.url, backend.storage_options, barrier, results)
        )
        for _ in range(writers)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=900) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=300)
            if proc.is_alive():
                proc.kill()
    errors = [detail for status, detail in outcomes if status == "error"]
    assert not errors, errors
    assert all(proc.exitcode == 0 for proc in procs)
    return [published for _, published in outcomes]


def _data_dirs(backend: Backend, key: str) -> set[str]:
    entry = backend.entry(key)
    return {
        p[len(entry) + 1 :].split("/", 1)[0]
        for p in backend.fs.find(entry, withdirs=True)
        if p[len(entry) + 1 :].startswith("d-")
    }


def _check_single_entry(backend: Backend, published: list[bool]) -> None:
    key, _ = entry_for(0)
    cache = backend.cache()
    # Exactly one writer published; the others found or lost to its entry.
    assert sorted(published) == [False] * (len(published) - 1) + [True]
    manifest = cache.verify(key)
    hit = cache.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, _value())
    # The losers removed their data: only the manifest's data directory is left.
    assert _data_dirs(backend, key) == {manifest.data_dir}
    assert cache.gc(older_than=0) == []
    names = sorted(p[len(backend.entry(key)) + 1 :] for p in backend.fs.find(backend.entry(key)))
    assert names == sorted(
        ["manifest.json", "used", *(f"{manifest.data_dir}/{f.name}" for f in manifest.files)]
    )
    assert [e.key for e in cache.entries()] == [key]


def test_local_writers_race_to_one_entry(tmp_path: Path) -> None:
    backend = _local_backend(tmp_path)
    published = _race(backend, writers=6)
    _check_single_entry(backend, published)
    key, _ = entry_for(0)
    entry = Path(backend.entry(key))
    assert sorted(p.name for p in entry.iterdir() if p.name.startswith("d-")) == [
        backend.cache().manifest(key).data_dir  # type: ignore[union-attr]
    ]
    # No temporary manifests or scratch files anywhere under the root.
    leftovers = [
        str(p)
        for p in Path(backend.root).rglob("*")
        if p.name.startswith(".") or p.name.endswith(".tmp")
    ]
    assert leftovers == []


def test_s3_writers_race_to_one_entry(s3_server: dict[str, Any], s3_bucket: str) -> None:
    backend = _s3_backend(s3_server, s3_bucket)
    published = _race(backend, writers=4)
    _check_single_entry(backend, published)


# ------------------------------------------- forced reader/writer interleavings
def test_reader_keeps_an_entry_republished_while_it_read(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader whose data vanished because the entry was evicted and stored
    again meanwhile must read the new entry, not drop it as "partial"."""
    caplog.set_level(logging.INFO, logger="eeipu_ray.cache")
    reader, other = backend.cache(), backend.cache()
    key, meta = entry_for(0)
    other.store(key, _value(), meta)
    old_dir = other.manifest(key).data_dir  # type: ignore[union-attr]
    original = FsStore.read_part
    calls = {"n": 0}

    def evict_and_restore_first(self: FsStore, key_: str, data_dir: str, part: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # between the reader's manifest read and its data read
            other.delete(key)
            assert other.store(key, _value(), meta).published
        return original(self, key_, data_dir, part)

    monkeypatch.setattr(FsStore, "read_part", evict_and_restore_first)
    hit = reader.load(key)
    assert hit is not None and hit.manifest.data_dir != old_dir
    np.testing.assert_array_equal(hit.value, _value())
    assert reader.contains(key)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_reader_does_not_drop_an_entry_replaced_after_it_judged_it_broken(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader finds a corrupted entry; before it removes it, a writer replaces the
    entry with a good one. The good entry stays."""
    reader, writer = backend.cache(), backend.cache()
    key, meta = entry_for(0)
    writer.store(key, _value(), meta)
    manifest_path = f"{backend.entry(key)}/manifest.json"
    backend.fs.pipe_file(manifest_path, b"{not json")
    original = FsStore.delete_if_unchanged

    def replaced_first(self: FsStore, key_: str, raw: bytes) -> bool:
        writer.delete(key)
        assert writer.store(key, _value(), meta).published
        return original(self, key_, raw)

    monkeypatch.setattr(FsStore, "delete_if_unchanged", replaced_first)
    assert reader.load(key) is None  # this read saw the broken manifest
    monkeypatch.undo()
    hit = reader.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, _value())


def test_gc_of_an_empty_entry_directory_does_not_break_a_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local: gc removes empty entry directories; a writer that created one a
    moment earlier creates it again."""
    backend = _local_backend(tmp_path)
    cache = backend.cache()
    key, meta = entry_for(0)
    real_makedirs = os.makedirs
    state = {"raced": False}

    def makedirs_with_gc(path: str, *args: Any, **kwargs: Any) -> None:
        if not state["raced"] and os.path.basename(path).startswith("d-"):
            state["raced"] = True
            real_makedirs(os.path.dirname(path), exist_ok=True)
            cache.gc(older_than=0)  # removes the still empty entry directory
            assert not os.path.exists(os.path.dirname(path))
            raise FileNotFoundError(2, "No such file or directory", path)
        real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs_with_gc)
    assert cache.store(key, _value(), meta).published
    monkeypatch.undo()
    assert state["raced"] and cache.load(key) is not None
