"""Codecs for Hugging Face values: ``datasets`` datasets, ``transformers`` models and tokenizers."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eeipu_ray.cache.codecs import Codec, CodecRegistry, Encoded, PartData, PathCodec, StreamPart
from eeipu_ray.errors import CacheIntegrityError, CodecError

# Rows per record batch when a dataset has an indices mapping (after select,
# shuffle, ...) and its rows must be gathered: bounds the memory of one batch.
_ROWS_PER_GATHERED_BATCH = 1000


# ------------------------------------------------------------ hf datasets
class HFDatasetCodec(Codec):
    """A ``datasets.Dataset`` or ``datasets.DatasetDict``, one Arrow IPC stream per
    dataset (the format of the library's own cache files).

    A local entry loads back without a copy: the dataset's Arrow table reads the
    memory-mapped part in place. From S3 the part is read into memory first.
    Features (``ClassLabel`` names and the like), the rest of ``DatasetInfo``,
    the split, the format (``with_format("torch", columns=[...])``) and, for an
    unformatted dataset, the fingerprint come back; a ``DatasetDict`` keeps its
    split names (as ``str``) and order. An indices mapping (``select``,
    ``shuffle``, ``filter``) is applied on store, so only the selected rows are
    written. The loaded dataset has no ``cache_files``: it is held by the
    cache's memory map, not by a file of its own.
    """

    name = "hf_dataset"

    def matches(self, value: Any) -> bool:
        # No import: a Dataset can only exist once its module is loaded.
        arrow_dataset = sys.modules.get("datasets.arrow_dataset")
        dataset_dict = sys.modules.get("datasets.dataset_dict")
        return (arrow_dataset is not None and isinstance(value, arrow_dataset.Dataset)) or (
            dataset_dict is not None and isinstance(value, dataset_dict.DatasetDict)
        )

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        from datasets import Dataset

        if isinstance(value, Dataset):
            part, state = _dataset_part(value, "the dataset")
            return Encoded(self.name, {"data": part}, {"kind": "dataset", "dataset": state})
        parts: dict[str, PartData] = {}
        splits: list[dict[str, Any]] = []
        for split, dataset in value.items():
            split_name = _split_name(split)
            if not isinstance(dataset, Dataset):
                raise CodecError(
                    f"DatasetDict split {split_name!r} holds a {type(dataset).__qualname__}, "
                    "not a datasets.Dataset; only map-style datasets can be stored"
                )
            # Parts get neutral names; split names travel in meta.
            part_name = f"s{len(splits)}"
            parts[part_name], state = _dataset_part(dataset, f"split {split_name!r}")
            splits.append({"name": split_name, "part": part_name, "dataset": state})
        return Encoded(self.name, parts, {"kind": "dict", "splits": splits})

    def decode(self, parts, meta, workdir, registry):
        if meta.get("kind") == "dataset":
            return _load_dataset(parts["data"], meta["dataset"])
        if meta.get("kind") != "dict":
            raise CodecError(f"hf_dataset entry of unknown kind {meta.get('kind')!r}")
        from datasets import DatasetDict

        return DatasetDict(
            {
                split["name"]: _load_dataset(parts[split["part"]], split["dataset"])
                for split in meta["splits"]
            }
        )


def _split_name(split: Any) -> str:
    from datasets import NamedSplit

    if isinstance(split, str | NamedSplit):
        return str(split)
    raise CodecError(
        f"DatasetDict key {split!r} ({type(split).__qualname__}) is not a split name; use str keys"
    )


def _dataset_part(dataset: Any, what: str) -> tuple[StreamPart, dict[str, Any]]:
    """The dataset's rows as an Arrow IPC stream part, and the JSON state to rebuild it."""
    import pyarrow as pa
    from datasets.utils.py_utils import asdict

    # Read from the private attributes as the library's own save_to_disk does:
    # the public ``format`` lists every column where none were chosen, and a
    # dataset restored with that list would hide the columns a later map adds.
    format_state = {
        "type": dataset._format_type,
        "format_kwargs": dict(dataset._format_kwargs),
        "columns": dataset._format_columns,
        "output_all_columns": dataset._output_all_columns,
    }
    for key, kwarg in format_state["format_kwargs"].items():
        if not _is_json(kwarg):
            raise CodecError(
                f"{what}: format argument {key!r}={kwarg!r} does not survive JSON; "
                "return the dataset with reset_format() or with JSON-able format arguments"
            )
    state = {
        "info": asdict(dataset.info),
        "split": None if dataset.split is None else str(dataset.split),
        "fingerprint": dataset._fingerprint,
        "format": format_state,
        "num_rows": dataset.num_rows,
    }
    if not _is_json(state):
        raise CodecError(f"{what}: its DatasetInfo does not survive JSON ({state['info']!r})")
    # The features travel in the schema too, as in the library's own Arrow files.
    base = dataset.data.schema
    schema = base.with_metadata(
        {**(base.metadata or {}), **(dataset.features.arrow_schema.metadata or {})}
    )

    def write(fh: Any) -> None:
        sink = fh if isinstance(fh, pa.NativeFile) else pa.PythonFile(fh, mode="w")
        with pa.ipc.new_stream(sink, schema) as writer:
            for batch in _record_batches(dataset):
                writer.write_batch(batch)

    return StreamPart(write), state


def _record_batches(dataset: Any) -> Any:
    if getattr(dataset, "_indices", None) is None:
        # The table's own chunks: no copy.
        yield from dataset.data.to_batches()
        return
    for table in dataset.with_format("arrow").iter(batch_size=_ROWS_PER_GATHERED_BATCH):
        yield from table.to_batches()


def _load_dataset(blob: Any, state: Mapping[str, Any]) -> Any:
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, NamedSplit
    from datasets.table import InMemoryTable

    # py_buffer wraps the memory map (or bytes) in place; the IPC reader slices it.
    table = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(blob))).read_all()
    if table.num_rows != state["num_rows"]:
        raise CacheIntegrityError(
            f"hf_dataset part holds {table.num_rows} rows, the manifest says {state['num_rows']}"
        )
    dataset = Dataset(
        InMemoryTable(table),
        info=DatasetInfo.from_dict(state["info"]),
        split=None if state["split"] is None else NamedSplit(state["split"]),
        fingerprint=state["fingerprint"],
    )
    fmt = state["format"]
    if fmt["type"] is not None or fmt["columns"] is not None or fmt["format_kwargs"]:
        dataset = dataset.with_format(**fmt)
    return dataset


def _is_json(value: Any) -> bool:
    # Serializable is enough: tuples come back as lists, which the library accepts.
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# ---------------------------------------------------------- transformers
_PRETRAINED_BASES = {
    # kind: (module, class); the value's type must derive from the class.
    "model": ("transformers.modeling_utils", "PreTrainedModel"),
    "tokenizer": ("transformers.tokenization_utils_base", "PreTrainedTokenizerBase"),
}


class PretrainedCodec(Codec):
    """A ``transformers`` model (``PreTrainedModel``) or tokenizer
    (``PreTrainedTokenizerBase``): written with ``save_pretrained`` and loaded
    with ``from_pretrained`` of the same class, from local files only (never
    the network).

    The files are restored under the trial's work directory, which stays the
    object's ``name_or_path``. A model comes back on the CPU, with its dtype,
    its train/eval mode and its frozen (``requires_grad=False``) parameters.
    The class is found by its module and name: a class of ``transformers`` is
    imported when needed, any other class (your own model) must already be
    imported in the reading process; the cache never imports a module that
    an entry names outside ``transformers``. A stage can also return the
    ``pathlib.Path`` of a ``save_pretrained`` directory (the ``path`` codec)
    and call ``from_pretrained`` itself in the next stage.
    """

    name = "hf_pretrained"

    def matches(self, value: Any) -> bool:
        return _pretrained_kind(value) is not None

    def encode(self, value: Any, registry: CodecRegistry) -> Encoded:
        kind = _pretrained_kind(value)
        if kind is None:
            raise CodecError(f"{type(value).__qualname__} is not a transformers model or tokenizer")
        cls = type(value)
        class_ref = {"module": cls.__module__, "qualname": cls.__qualname__}
        try:
            found = _resolve_class(class_ref, kind, importing=False)
        except CodecError:
            found = None
        if found is not cls:
            raise CodecError(
                f"{cls.__module__}.{cls.__qualname__} cannot be found again by its name "
                "(a class defined inside a function?); define it at module level"
            )
        meta: dict[str, Any] = {"kind": kind, "class": class_ref}
        if kind == "model":
            meta["dtype"] = str(value.dtype).removeprefix("torch.")
            meta["training"] = bool(value.training)
            meta["frozen"] = [n for n, p in value.named_parameters() if not p.requires_grad]
        scratch = _ScratchDir()
        try:
            directory = scratch.path / "pretrained"
            value.save_pretrained(directory)
            files = PathCodec().encode(directory, registry)
        except BaseException:
            scratch.remove()
            raise
        meta["files"] = files.meta
        # The saved files are read when the cache writes the parts; each part
        # holds the scratch directory, which goes when the encoded value does.
        parts = {name: _holding(part, scratch) for name, part in files.parts.items()}
        return Encoded(self.name, parts, meta)

    def decode(self, parts, meta, workdir, registry):
        kind = meta.get("kind")
        if kind not in _PRETRAINED_BASES:
            raise CodecError(f"hf_pretrained entry of unknown kind {kind!r}")
        cls = _resolve_class(meta["class"], kind, importing=True)
        directory = PathCodec().decode(parts, meta["files"], workdir, registry)
        if kind == "tokenizer":
            return cls.from_pretrained(directory, local_files_only=True)
        import torch

        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CodecError(f"hf_pretrained entry names an unknown torch dtype {meta['dtype']!r}")
        model = cls.from_pretrained(directory, local_files_only=True, dtype=dtype)
        model.train(bool(meta["training"]))
        frozen = set(meta.get("frozen", ()))
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        return model


def _pretrained_kind(value: Any) -> str | None:
    for kind, (module_name, class_name) in _PRETRAINED_BASES.items():
        # No import: such a value can only exist once its base class's module is loaded.
        module = sys.modules.get(module_name)
        base = getattr(module, class_name, None) if module is not None else None
        if base is not None and isinstance(value, base):
            return kind
    return None


def _resolve_class(class_ref: Mapping[str, Any], kind: str, *, importing: bool) -> type:
    """The class an entry names, if it is a subclass of ``kind``'s base class.

    Only modules of ``transformers`` are imported (``importing=True``); any
    other module must already be loaded: an entry must not make the reader
    import code it names.
    """
    module_name = str(class_ref.get("module", ""))
    qualname = str(class_ref.get("qualname", ""))
    where = f"{module_name}.{qualname}"
    module = sys.modules.get(module_name)
    if module is None and importing and module_name.partition(".")[0] == "transformers":
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CodecError(f"cannot import {module_name!r} for {where}: {exc}") from exc
    if module is None:
        raise CodecError(
            f"the entry holds a {where}, and module {module_name!r} is not imported in this "
            "process; import it before loading (the cache imports only transformers' own "
            "modules)"
        )
    found: Any = module
    for attr in qualname.split("."):
        found = getattr(found, attr, None)
    base_module, base_name = _PRETRAINED_BASES[kind]
    base = getattr(importlib.import_module(base_module), base_name)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise CodecError(f"{where} is not a {base_name} subclass in this process")
    return found


class _ScratchDir:
    """A temporary directory removed when the last reference to it goes."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="eeipu-pretrained-"))
        self.remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


def _holding(part: PartData, keep: _ScratchDir) -> StreamPart:
    def write(fh: Any) -> None:
        _ = keep  # referenced so the scratch directory lives as long as the part
        part.write(fh)

    return StreamPart(write)
