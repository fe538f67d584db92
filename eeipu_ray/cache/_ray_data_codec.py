"""Codec for Ray Data datasets (``ray.data.Dataset``), block by block as Parquet."""

from __future__ import annotations

import sys
from typing import Any

from eeipu_ray.cache.codecs import Codec, CodecRegistry, Encoded, PartData, StreamPart
from eeipu_ray.errors import CacheIntegrityError, CodecError


class RayDatasetCodec(Codec):
    """A ``ray.data.Dataset``: each block one Parquet file in the entry.

    Storing executes a lazy dataset (``materialize()``) and fetches one block
    at a time into the storing process, so a dataset larger than its memory
    can be stored. Loading reads the Parquet parts (from the memory-mapped
    files of a local entry, or the bytes fetched from S3) into Arrow tables in
    the loading process and returns ``ray.data.from_arrow`` of them: a
    materialized dataset with the same schema, rows, row order and blocks.
    It does not hand Ray a path to the entry's files (``read_parquet``): the
    read tasks of a multi-node cluster could run where that path does not
    exist. Loading starts a local Ray if none is running, as any Ray Data call
    does.
    """

    name = "ray_dataset"

    def matches(self, value: Any) -> bool:
        # No import: a Dataset can only exist once its module is loaded.
        module = sys.modules.get("ray.data.dataset")
        return module is not None and isinstance(value, module.Dataset)

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import pyarrow as pa

        materialized = value.materialize()
        refs = materialized.to_arrow_refs()
        num_rows = materialized.count()  # from block metadata: no execution
        parts: dict[str, PartData] = {}
        names: list[str] = []
        for ref in refs:
            name = f"block-{len(names):05d}.parquet"
            parts[name] = StreamPart(_parquet_writer(ref))
            names.append(name)
        if not refs:
            # No blocks to take the schema from: store it as one empty block.
            schema = materialized.schema()
            base = getattr(schema, "base_schema", None)
            if isinstance(base, pa.Schema):
                parts["block-00000.parquet"] = StreamPart(_parquet_writer(base.empty_table()))
                names.append("block-00000.parquet")
        return Encoded(self.name, parts, {"blocks": names, "num_rows": num_rows})

    def decode(self, parts, meta, workdir, registry):
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray.data  # registers Ray's Arrow extension types (tensor columns)

        names = meta.get("blocks")
        if not isinstance(names, list) or set(names) != set(parts):
            raise CacheIntegrityError("ray_dataset entry's block list does not match its parts")
        tables = [pq.read_table(pa.BufferReader(pa.py_buffer(parts[name]))) for name in names]
        rows = sum(t.num_rows for t in tables)
        if rows != meta.get("num_rows"):
            raise CacheIntegrityError(
                f"ray_dataset parts hold {rows} rows, the manifest says {meta.get('num_rows')}"
            )
        if not tables:  # a dataset without blocks and without a known schema
            return ray.data.from_items([])
        return ray.data.from_arrow(tables)


def _parquet_writer(block: Any) -> Any:
    """``write(fh)`` of one block (an Arrow table or an object ref to one) as Parquet."""

    def write(fh: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = block
        if not isinstance(table, pa.Table):
            import ray

            table = ray.get(block)
        if not isinstance(table, pa.Table):
            raise CodecError(
                f"a Ray Data block came back as {type(table).__qualname__}, not an Arrow table"
            )
        sink = fh if isinstance(fh, pa.NativeFile) else pa.PythonFile(fh, mode="w")
        pq.write_table(table, sink)

    return write
