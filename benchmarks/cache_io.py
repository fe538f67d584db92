"""Cache I/O throughput next to raw pyarrow / safetensors / s3fs doing the same copy.

For each payload (an Arrow table, a torch state dict) and each backend (a local
directory; S3 on a loopback moto server), measure in the same run:

* raw write: the library writing the payload straight to the destination
  (``pyarrow.ipc`` to a file / ``s3fs.pipe_file`` of the IPC bytes;
  ``safetensors.torch.save_file`` / ``pipe_file`` of ``save(...)``);
* raw read: reading it back into memory and deserializing it;
* cache write: ``PrefixCache.store`` (encode, checksum, publish atomically);
* cache read: ``PrefixCache.load`` (read, verify checksums, decode).

Prints MB/s and the ratio cache/raw (goal: >= 0.8). Each figure is the best of
``--repeat`` runs. Example::

    python benchmarks/cache_io.py --arrow-mib 1024 --state-dict-mb 500 --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from eeipu_ray.cache import EntryMeta, PrefixCache


def arrow_table(mib: int) -> pa.Table:
    rows = mib * 2**20 // (8 * 4)
    rng = np.random.default_rng(0)
    return pa.table({f"c{i}": rng.standard_normal(rows) for i in range(4)})


def state_dict(mb: int) -> dict[str, torch.Tensor]:
    per = 4 * 1024 * 1024  # 16 MB float32 tensors, like a large layer
    n = max(1, mb * 10**6 // (per * 4))
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def nbytes(value: Any) -> int:
    if isinstance(value, pa.Table):
        return value.nbytes
    return sum(t.numel() * t.element_size() for t in value.values())


def interleaved(ops: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Best time of each op over ``repeat`` rounds; rounds alternate raw and cache
    so page-cache writeback and other load hit both alike."""
    best = {name: float("inf") for name in ops}
    for _ in range(repeat):
        for name, fn in ops.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def raw_ops(kind: str, value: Any, backend: str, fs: Any, base: str) -> tuple[Callable, Callable]:
    """Raw write and read; every write goes to a new path, as every cache entry does."""
    from safetensors.torch import load, save, save_file

    state = {"path": ""}

    def fresh() -> str:
        state["path"] = f"{base}/raw-{uuid.uuid4().hex}"
        return state["path"]

    if backend == "local":
        if kind == "arrow":

            def write() -> None:
                with pa.ipc.new_file(fresh(), value.schema) as w:
                    w.write_table(value)

            def read() -> None:
                with pa.OSFile(state["path"]) as f:
                    buf = f.read_buffer()
                pa.ipc.open_file(buf).read_all()
        else:

            def write() -> None:
                save_file(value, fresh())

            def read() -> None:
                # load_file maps the file lazily; read it in like the cache does.
                with open(state["path"], "rb") as fh:
                    load(fh.read())

        return write, read
    if kind == "arrow":

        def write() -> None:
            fs.pipe_file(fresh(), _ipc_bytes(value).to_pybytes())

        def read() -> None:
            pa.ipc.open_file(pa.py_buffer(fs.cat_file(state["path"]))).read_all()
    else:

        def write() -> None:
            fs.pipe_file(fresh(), save(value))

        def read() -> None:
            load(fs.cat_file(state["path"]))

    return write, read


def cache_ops(value: Any, cache: PrefixCache, workdir: str) -> tuple[Callable, Callable]:
    state = {}

    def write() -> None:
        meta = EntryMeta("bench", ["s"], ["1"], [{"run": uuid.uuid4().hex}], [1.0])
        key = meta.expected_key()
        cache.store(key, value, meta)
        state["key"] = key

    def read() -> None:
        hit = cache.load(state["key"], workdir=workdir)
        assert hit is not None, "cache miss in benchmark"

    return write, read


def start_moto() -> tuple[Any, dict[str, Any]]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {
        "key": "bench",
        "secret": "bench",
        "endpoint_url": f"http://127.0.0.1:{port}",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=opts["endpoint_url"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench-bucket")
    return server, opts


def main() -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arrow-mib", type=int, default=1024)
    ap.add_argument("--state-dict-mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="local,s3")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    payloads = {"arrow": arrow_table(args.arrow_mib), "safetensors": state_dict(args.state_dict_mb)}
    rows = []
    tmp = tempfile.mkdtemp(prefix="eeipu-bench-")
    server = None
    try:
        for backend in args.backends.split(","):
            if backend == "local":
                import fsspec

                fs, base = fsspec.filesystem("file"), os.path.join(tmp, "raw")
                os.makedirs(base)
                cache = PrefixCache(os.path.join(tmp, "cache"))
            else:
                import s3fs

                server, opts = start_moto()
                fs, base = s3fs.S3FileSystem(**opts), "bench-bucket/raw"
                cache = PrefixCache("s3://bench-bucket/cache", storage_options=opts)
            for kind, value in payloads.items():
                size = nbytes(value)
                raw_w, raw_r = raw_ops(kind, value, backend, fs, base)
                c_w, c_r = cache_ops(value, cache, os.path.join(tmp, "restore"))
                t = interleaved(
                    {"raw_write": raw_w, "cache_write": c_w, "raw_read": raw_r, "cache_read": c_r},
                    args.repeat,
                )
                row = {
                    "backend": backend,
                    "payload": kind,
                    "mb": size / 1e6,
                    **{f"{k}_mb_s": size / 1e6 / v for k, v in t.items()},
                    "write_ratio": t["raw_write"] / t["cache_write"],
                    "read_ratio": t["raw_read"] / t["cache_read"],
                }
                rows.append(row)
                cache.clear()
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"# cache I/O, {platform.node()} ({os.cpu_count()} CPUs), python {sys.version.split()[0]}, "
        f"pyarrow {pa.__version__}, torch {torch.__version__}, best of {args.repeat}"
    )
    print(
        f"{'backend':<7} {'payload':<12} {'MB':>7} {'raw w MB/s':>11} {'cache w':>9} "
        f"{'ratio':>6} {'raw r MB/s':>11} {'cache r':>9} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['backend']:<7} {r['payload']:<12} {r['mb']:>7.0f} {r['raw_write_mb_s']:>11.0f} "
            f"{r['cache_write_mb_s']:>9.0f} {r['write_ratio']:>6.2f} {r['raw_read_mb_s']:>11.0f} "
            f"{r['cache_read_mb_s']:>9.0f} {r['read_ratio']:>6.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"argv": sys.argv, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
