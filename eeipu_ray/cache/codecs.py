"""Codecs: how a stage output becomes bytes in the prefix cache, and back.

A codec is chosen by the value's type; the first registered codec whose
:meth:`Codec.matches` accepts the value encodes it. Built in, in order:

=================  ==========================================================  =====================
name               values                                                      format
=================  ==========================================================  =====================
``hf_dataset``     ``datasets.Dataset``, ``datasets.DatasetDict``               Arrow IPC stream
``hf_pretrained``  ``transformers`` models and tokenizers                      ``save_pretrained``
``ray_dataset``    ``ray.data.Dataset``                                        Parquet per block
``arrow``          ``pyarrow.Table``, ``pyarrow.RecordBatch``                  Arrow IPC or Parquet
``pandas``         ``pandas.DataFrame`` (through Arrow, index kept)            Arrow IPC file
``torch``          ``torch.Tensor``, ``{str: torch.Tensor}`` (state dicts)     safetensors
``numpy``          ``numpy.ndarray`` and NumPy scalars (not ``object`` dtype)  ``.npy``
``path``           ``pathlib.Path`` to a file or a directory (checkpoints)     the files themselves
``json``           ``None``/bool/int/float/str, lists and str-keyed dicts      JSON
``composite``      tuples, lists, dicts mixing any of the above                a part group per leaf
``pickle``         anything; **only when the cache was opened with
                   ``allow_pickle=True``**: a shared cache is a trust boundary  pickle protocol 5
=================  ==========================================================  =====================

The first three live in :mod:`eeipu_ray.cache._hf_codecs` and
:mod:`eeipu_ray.cache._ray_data_codec`; none of them imports its library
until a value of its type is stored or loaded.

An encoded value is a set of named *parts* (bytes-like buffers) plus a small
JSON ``meta`` dict; the cache stores, checksums and transfers parts without
knowing what they mean.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from eeipu_ray.errors import CodecError

#: A bytes-like object: ``bytes``, ``bytearray``, ``memoryview``, ``pyarrow.Buffer``.
Blob = Any
#: An encoded part: one blob, or a sequence of blobs written back to back.
PartData = Any

_PART_COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")  # used with fullmatch


@dataclass
class Encoded:
    """A value in stored form.

    Attributes:
        codec: Name of the codec that produced it.
        parts: ``{part_name: blob or [blobs]}``; part names are relative POSIX
            paths made of safe components (checked by :func:`check_part_name`).
        meta: JSON-able dict the codec needs to decode.
    """

    codec: str
    parts: dict[str, PartData]
    meta: dict[str, Any] = field(default_factory=dict)


class Codec(ABC):
    """Turns values of some types into parts and back.

    Subclass it and pass an instance in ``PrefixCache(codecs=[...])`` to store a
    type the built-in codecs do not know; custom codecs are tried first.
    """

    #: Stored in the manifest; must be unique in a registry.
    name: str = ""

    @abstractmethod
    def matches(self, value: Any) -> bool:
        """Whether this codec can encode ``value``."""

    @abstractmethod
    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        """Encode ``value``. ``registry`` lets container codecs encode children."""

    @abstractmethod
    def decode(
        self,
        parts: Mapping[str, Blob],
        meta: Mapping[str, Any],
        workdir: Path,
        registry: CodecRegistry,
    ) -> Any:
        """Rebuild the value from verified parts. ``workdir`` is a private local
        directory for codecs that materialize files."""


# --------------------------------------------------------------------- arrow
class ArrowCodec(Codec):
    """``pyarrow.Table`` / ``RecordBatch`` as an Arrow IPC file (zero-copy reads),
    or as Parquet with ``ArrowCodec(format="parquet")`` (smaller, slower)."""

    name = "arrow"

    def __init__(self, format: str = "ipc") -> None:  # "format" mirrors pyarrow's naming
        if format not in ("ipc", "parquet"):
            raise ValueError(f"ArrowCodec format must be 'ipc' or 'parquet', got {format!r}")
        self.format = format

    def matches(self, value: Any) -> bool:
        if "pyarrow" not in sys.modules:
            return False
        import pyarrow as pa

        return isinstance(value, pa.Table | pa.RecordBatch)

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import pyarrow as pa

        kind = "batch" if isinstance(value, pa.RecordBatch) else "table"
        table = pa.Table.from_batches([value]) if kind == "batch" else value
        fmt = self.format

        def write(fh: Any) -> None:
            sink = fh if isinstance(fh, pa.NativeFile) else pa.PythonFile(fh, mode="w")
            if fmt == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(table, sink)
            else:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)

        return Encoded(self.name, {"data": StreamPart(write)}, {"kind": kind, "format": fmt})

    def decode(self, parts, meta, workdir, registry):
        import pyarrow as pa

        buf = pa.py_buffer(parts["data"])
        if meta.get("format") == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(buf))
        else:
            table = pa.ipc.open_file(pa.BufferReader(buf)).read_all()
        if meta.get("kind") == "batch":
            return (
                table.combine_chunks().to_batches()[0]
                if table.num_rows
                else (pa.RecordBatch.from_pylist([], schema=table.schema))
            )
        return table


class PandasCodec(Codec):
    """``pandas.DataFrame`` through Arrow (index and dtypes kept by pandas metadata)."""

    name = "pandas"

    def matches(self, value: Any) -> bool:
        if "pandas" not in sys.modules:
            return False
        import pandas as pd

        return isinstance(value, pd.DataFrame)

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import pyarrow as pa

        _check_pandas_labels(value)
        try:
            table = pa.Table.from_pandas(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            # ValueError: duplicate column names, among others.
            raise CodecError(f"DataFrame cannot be stored as Arrow: {exc}") from exc
        enc = ArrowCodec().encode(table, registry)
        return Encoded(self.name, enc.parts, enc.meta)

    def decode(self, parts, meta, workdir, registry):
        return ArrowCodec().decode(parts, meta, workdir, registry).to_pandas()


def _check_pandas_labels(df: Any) -> None:
    # Arrow turns these labels into strings with only a warning: the DataFrame
    # would come back different from what the stage returned.
    import pandas as pd

    levels = getattr(df.columns, "levels", [df.columns])
    for level in levels:
        if level.dtype == object and "mixed" in pd.api.types.infer_dtype(level, skipna=False):
            raise CodecError(
                f"DataFrame column names of mixed types ({list(level)[:10]!r}) do not survive "
                "Arrow; make them all strings (df.columns = df.columns.map(str))"
            )
    bad = [n for n in df.index.names if n is not None and not isinstance(n, str)]
    if bad:
        raise CodecError(
            f"DataFrame index names {bad!r} are not strings and do not survive Arrow; "
            "rename them (df.index.names = [...])"
        )


# --------------------------------------------------------------------- torch
class TorchCodec(Codec):
    """A ``torch.Tensor`` or a ``{str: Tensor}`` state dict, as safetensors.

    Tensors that share storage (tied weights, e.g. T5's embeddings) are stored
    once and tied again on load. Tensors come back on the CPU.
    """

    name = "torch"

    def matches(self, value: Any) -> bool:
        if "torch" not in sys.modules:
            return False
        import torch

        if isinstance(value, torch.Tensor):
            return True
        return (
            isinstance(value, Mapping)
            and len(value) > 0
            and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) for v in value.values())
        )

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import torch

        from eeipu_ray.cache._safetensors import to_buffers as to_safetensors_buffers

        single = isinstance(value, torch.Tensor)
        tensors = {"tensor": value} if single else dict(value)
        unique: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        first_by_view: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], str], str] = {}
        for name, tensor in tensors.items():
            t = tensor.detach()
            if t.layout != torch.strided:
                raise CodecError(
                    f"tensor {name!r} has layout {t.layout}; convert it with .to_dense()"
                )
            view = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                str(t.dtype),
            )
            if t.numel() > 0 and view in first_by_view:
                aliases[name] = first_by_view[view]
                continue
            first_by_view[view] = name
            unique[name] = t
        try:
            data = to_safetensors_buffers(unique)
        except TypeError as exc:
            raise CodecError(str(exc)) from exc
        meta = {"single": single, "aliases": aliases, "order": list(tensors)}
        return Encoded(self.name, {"data": data}, meta)

    def decode(self, parts, meta, workdir, registry):
        from eeipu_ray.cache._safetensors import from_buffer

        tensors, _ = from_buffer(parts["data"])
        for name, target in meta.get("aliases", {}).items():
            tensors[name] = tensors[target]
        if meta.get("single"):
            return tensors["tensor"]
        order = meta.get("order")
        if order is not None and set(order) == set(tensors):
            return {name: tensors[name] for name in order}
        return tensors


# --------------------------------------------------------------------- numpy
class NumpyCodec(Codec):
    """``numpy.ndarray`` in ``.npy`` format (no pickled object arrays), and NumPy
    scalars (``np.float64(...)``) as 0-d arrays. Masked arrays are left to other
    codecs: the ``.npy`` format would drop the mask."""

    name = "numpy"

    def matches(self, value: Any) -> bool:
        if "numpy" not in sys.modules:
            return False
        import numpy as np

        if isinstance(value, np.ma.MaskedArray):
            return False
        return isinstance(value, np.ndarray | np.generic) and not value.dtype.hasobject

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import numpy as np

        scalar = isinstance(value, np.generic)
        if scalar:
            value = np.asarray(value)
        header = io.BytesIO()
        arr = np.ascontiguousarray(value) if not value.flags.f_contiguous else value
        np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(arr))
        # A uint8 view, not memoryview(...).cast("B"): the buffer protocol cannot
        # export every dtype (datetime64, timedelta64).
        body = memoryview(arr.reshape(-1, order="A").view(np.uint8)) if arr.size else b""
        return Encoded(self.name, {"data": [header.getvalue(), body]}, {"scalar": scalar})

    def decode(self, parts, meta, workdir, registry):
        import numpy as np

        buf = memoryview(parts["data"]).cast("B")
        stream = io.BytesIO(buf[: 65536 + 16].tobytes())  # the header is small
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(stream)
        offset = stream.tell()
        count = 1
        for n in shape:
            count *= n
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
        if not arr.flags.writeable:
            # Read-only bytes or a read-only memory map: a stage may modify its
            # input in place on a computed run, so it must be able to on a loaded one.
            arr = arr.copy()
        arr = arr.reshape(shape, order="F" if fortran else "C")
        return arr[()] if meta.get("scalar") else arr


# ---------------------------------------------------------------------- path
class PathCodec(Codec):
    """A ``pathlib.Path`` to a file or directory (model checkpoints): the files
    are stored as they are, and come back as a fresh local copy under the
    trial's work directory. Symbolic links are refused: they could point
    anywhere on the reading machine."""

    name = "path"

    def matches(self, value: Any) -> bool:
        return isinstance(value, Path)

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        path = Path(value)
        if path.is_symlink():
            raise CodecError(f"path {str(path)!r} is a symbolic link; store the target instead")
        # Refuse at store time what decode would refuse to restore.
        raw_name = path.name if path.name not in ("", ".", "..") else path.resolve().name
        name = _safe_name(raw_name or "value")
        if path.is_file():
            return Encoded(self.name, {"file": _read_file(path)}, {"kind": "file", "name": name})
        if not path.is_dir():
            raise CodecError(f"path {str(path)!r} does not exist or is not a file or directory")
        parts: dict[str, PartData] = {}
        dirs: list[str] = []
        files: list[str] = []
        for root, dirnames, filenames in os.walk(path):
            rel_root = Path(root).relative_to(path)
            for d in sorted(dirnames):
                if (Path(root) / d).is_symlink():
                    raise CodecError(f"{Path(root) / d} is a symbolic link; refusing to store it")
                dirs.append((rel_root / d).as_posix())
            for f in sorted(filenames):
                full = Path(root) / f
                if full.is_symlink():
                    raise CodecError(f"{full} is a symbolic link; refusing to store it")
                if not full.is_file():  # a FIFO would block the read forever
                    raise CodecError(f"{full} is not a regular file; refusing to store it")
                rel = _safe_relative((rel_root / f).as_posix())
                # Parts get neutral names; the real relative paths travel in meta.
                parts[f"f{len(files)}"] = _read_file(full)
                files.append(rel)
        for d in dirs:
            _safe_relative(d)
        meta = {"kind": "dir", "name": name, "dirs": dirs, "files": files}
        return Encoded(self.name, parts, meta)

    def decode(self, parts, meta, workdir, registry):
        name = _safe_name(str(meta.get("name") or "value"))
        dest_root = Path(workdir) / f"restored-{uuid.uuid4().hex[:12]}"
        dest_root.mkdir(parents=True, exist_ok=False)
        dest = dest_root / name
        if meta.get("kind") == "file":
            dest.write_bytes(memoryview(parts["file"]))
            return dest
        dest.mkdir()
        for d in meta.get("dirs", []):
            (dest / _safe_relative(d)).mkdir(parents=True, exist_ok=True)
        for i, rel in enumerate(meta.get("files", [])):
            target = dest / _safe_relative(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(memoryview(parts[f"f{i}"]))
        return dest


def _safe_relative(rel: str) -> str:
    pure = PurePosixPath(rel)
    if (
        not rel
        or pure.is_absolute()
        or "\\" in rel
        or "\x00" in rel
        or any(c in ("", ".", "..") for c in pure.parts)
    ):
        raise CodecError(f"stored path {rel!r} is not a safe relative path; refusing to restore it")
    return rel


def _safe_name(name: str) -> str:
    _safe_relative(name)
    if "/" in name:
        raise CodecError(f"stored name {name!r} is not a single path component")
    return name


def _read_file(path: Path) -> StreamPart:
    """A part that copies the file in chunks when written (no full in-memory copy)."""

    def write(fh: Any) -> None:
        with open(path, "rb") as src:
            while chunk := src.read(8 * 2**20):
                fh.write(chunk)

    return StreamPart(write)


# ---------------------------------------------------------------------- json
class JsonCodec(Codec):
    """Values that survive a JSON round trip exactly: ``None``, bool, int, float
    (NaN and infinities included), str, lists, and dicts with str keys.
    Tuples are left to the composite codec so they come back as tuples."""

    name = "json"

    def matches(self, value: Any) -> bool:
        return _json_exact(value)

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        return Encoded(self.name, {"data": json.dumps(value).encode()}, {})

    def decode(self, parts, meta, workdir, registry):
        return json.loads(bytes(parts["data"]))


def _json_exact(value: Any, depth: int = 0) -> bool:
    if depth > 200:
        return False
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_json_exact(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_exact(v, depth + 1) for k, v in value.items())
    return False


# ----------------------------------------------------------------- composite
class CompositeCodec(Codec):
    """Tuples, lists and str-keyed dicts whose leaves other codecs can store,
    e.g. ``(X_train, y_train)`` or ``{"model": state_dict, "vocab": Path(...)}``."""

    name = "composite"

    def matches(self, value: Any) -> bool:
        # Exact types only: a subclass (namedtuple, OrderedDict, ...) would come
        # back as a plain tuple/list/dict, or, for a dict subclass, recurse forever.
        return type(value) in (tuple, list) or (
            type(value) is dict and all(isinstance(k, str) for k in value)
        )

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        parts: dict[str, PartData] = {}
        counter = [0]

        def walk(v: Any) -> Any:
            if v is None or type(v) in (bool, int, float, str):
                return {"t": "v", "v": v}
            if type(v) in (tuple, list) and not _is_leaf_type(v, registry):
                return {
                    "t": "tuple" if isinstance(v, tuple) else "list",
                    "items": [walk(x) for x in v],
                }
            if (
                type(v) is dict
                and all(isinstance(k, str) for k in v)
                and not _is_leaf_type(v, registry)
            ):
                return {"t": "dict", "items": [[k, walk(x)] for k, x in v.items()]}
            leaf_id = f"l{counter[0]}"
            counter[0] += 1
            enc = registry.encode_leaf(v)
            for pname, pdata in enc.parts.items():
                parts[f"{leaf_id}/{pname}"] = pdata
            return {"t": "leaf", "id": leaf_id, "codec": enc.codec, "meta": enc.meta}

        tree = walk(value)
        return Encoded(self.name, parts, {"tree": tree})

    def decode(self, parts, meta, workdir, registry):
        def build(node: Mapping[str, Any]) -> Any:
            t = node["t"]
            if t == "v":
                return node["v"]
            if t in ("tuple", "list"):
                items = [build(x) for x in node["items"]]
                return tuple(items) if t == "tuple" else items
            if t == "dict":
                return {k: build(x) for k, x in node["items"]}
            prefix = node["id"] + "/"
            sub = {k[len(prefix) :]: v for k, v in parts.items() if k.startswith(prefix)}
            return registry.get(node["codec"]).decode(sub, node["meta"], workdir, registry)

        return build(meta["tree"])


def _is_leaf_type(value: Any, registry: CodecRegistry) -> bool:
    # A container that a non-container codec claims (a state dict) is a leaf.
    return any(
        c.name not in ("json", "composite", "pickle") and c.matches(value) for c in registry.codecs
    )


# -------------------------------------------------------------------- pickle
class PickleCodec(Codec):
    """Anything picklable. Only active when the cache has ``allow_pickle=True``:
    unpickling runs code, so every writer of a shared cache must be trusted."""

    name = "pickle"

    def matches(self, value: Any) -> bool:
        return True

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        import pickle

        try:
            return Encoded(self.name, {"data": pickle.dumps(value, protocol=5)}, {})
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise CodecError(
                f"value of type {type(value).__name__} cannot be pickled: {exc}"
            ) from exc

    def decode(self, parts, meta, workdir, registry):
        import pickle

        return pickle.loads(memoryview(parts["data"]))


# ------------------------------------------------------------------ registry
def default_codecs() -> list[Codec]:
    """The built-in codecs, in the order they are tried (pickle is added by the
    registry, last, when allowed)."""
    return [
        # Library types first: each matches only its own classes.
        HFDatasetCodec(),
        PretrainedCodec(),
        RayDatasetCodec(),
        ArrowCodec(),
        PandasCodec(),
        TorchCodec(),
        NumpyCodec(),
        PathCodec(),
        JsonCodec(),
        CompositeCodec(),
    ]


class CodecRegistry:
    """The ordered codecs a cache uses; custom codecs come before the built-ins.

    Args:
        codecs: Extra codecs, tried first. One named like a built-in codec
            replaces it (``ArrowCodec(format="parquet")``); it must then also
            decode what the built-in wrote.
        allow_pickle: Add the pickle codec as the last resort (and allow decoding
            pickled entries). Off by default.
    """

    def __init__(self, codecs: Sequence[Codec] = (), allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        custom = list(codecs)
        names = [c.name for c in custom]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes or "" in names or "pickle" in names:
            raise ValueError(
                f"custom codec names must be unique, non-empty and not 'pickle' (set "
                f"allow_pickle instead); got {names}"
            )
        replaced = set(names)
        self.codecs: list[Codec] = [
            *custom,
            *(c for c in default_codecs() if c.name not in replaced),
        ]
        if allow_pickle:
            self.codecs.append(PickleCodec())
        self._by_name = {c.name: c for c in reversed(self.codecs)}

    def get(self, name: str) -> Codec:
        if name == "pickle" and not self.allow_pickle:
            raise CodecError(
                "this cache entry was stored with pickle, and the cache was opened without "
                "allow_pickle=True; open it with allow_pickle=True only if you trust every writer"
            )
        try:
            return self._by_name[name]
        except KeyError:
            raise CodecError(
                f"no codec named {name!r} is registered (have: {sorted(self._by_name)}); "
                "pass the custom codec that wrote this entry in PrefixCache(codecs=[...])"
            ) from None

    def encode(self, value: Any, *, stage: str | None = None) -> Encoded:
        """Encode a stage output; a :class:`CodecError` names the stage when no codec fits."""
        where = f"stage {stage!r}: " if stage else ""
        try:
            enc = self.encode_leaf(value)
        except CodecError as exc:
            raise CodecError(f"{where}{exc}") from exc
        except RecursionError as exc:
            raise CodecError(f"{where}value is nested too deeply (or contains itself)") from exc
        except Exception as exc:  # a codec's library failing on this value
            raise CodecError(
                f"{where}encoding a value of type {type(value).__qualname__} failed: {exc!r}"
            ) from exc
        for part in enc.parts:
            check_part_name(part)
        return enc

    def encode_leaf(self, value: Any) -> Encoded:
        for codec in self.codecs:
            if codec.matches(value):
                return codec.encode(value, self)
        hint = (
            ""
            if self.allow_pickle
            else (
                "; return Arrow/NumPy/torch/JSON values or a pathlib.Path, register a Codec, or "
                "open the cache with allow_pickle=True if every writer is trusted"
            )
        )
        raise CodecError(
            f"no codec can store a value of type {type(value).__module__}."
            f"{type(value).__qualname__}{hint}"
        )

    def decode(
        self, codec: str, parts: Mapping[str, Blob], meta: Mapping[str, Any], workdir: Path
    ) -> Any:
        return self.get(codec).decode(parts, meta, workdir, self)


def check_part_name(name: str) -> str:
    """Reject part names that could escape an entry's directory.

    Components are split on "/" as written (not normalized like ``PurePosixPath``
    would: "." and "a//b" would name the directory itself, or one file under two
    names on an object store); each must match ``[A-Za-z0-9_][A-Za-z0-9_.=+-]*``.
    """
    if (
        not isinstance(name, str)
        or not name
        or any(not _PART_COMPONENT_RE.fullmatch(c) for c in name.split("/"))
    ):
        raise CodecError(
            f"part name {name!r} is not a safe relative path (letters, digits, '_.=+-' per "
            "component, no '..', not absolute)"
        )
    return name


@dataclass(frozen=True)
class StreamPart:
    """A part produced by writing into a binary file object.

    Local stores hand ``write`` the destination file itself (through a hashing
    wrapper), so a large value goes to disk without an in-memory copy; other
    consumers materialize it (:func:`iter_blobs`).

    Attributes:
        write: ``write(fh)``; ``fh`` has ``write(buffer)`` and ``tell()``.
    """

    write: Callable[[Any], None]


def part_size(data: PartData) -> int:
    return sum(memoryview(b).nbytes for b in iter_blobs(data))


def iter_blobs(data: PartData) -> list[Blob]:
    """The part as a list of buffers (a :class:`StreamPart` is written to memory)."""
    if isinstance(data, StreamPart):
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        data.write(sink)
        return [sink.getvalue()]
    return list(data) if isinstance(data, list | tuple) else [data]


def write_part(data: PartData, fh: Any) -> None:
    """Write a part to a binary file object, streaming a :class:`StreamPart`."""
    if isinstance(data, StreamPart):
        data.write(fh)
        return
    for blob in data if isinstance(data, list | tuple) else [data]:
        fh.write(blob)


# Codecs of optional libraries, in modules of their own. Imported last: they
# subclass Codec and use the helpers above (the package imports this module
# first, so this import always finds them defined).
from eeipu_ray.cache._hf_codecs import HFDatasetCodec, PretrainedCodec  # noqa: E402
from eeipu_ray.cache._ray_data_codec import RayDatasetCodec  # noqa: E402
