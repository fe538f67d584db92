"""The T5 pipeline's ``source``/``target`` pairs: found, read and checked with ``datasets``."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from eeipu_ray.errors import PipelineDefinitionError

DEFAULT_DATA = Path(__file__).with_name("data") / "t5_toy.jsonl"
"""The shipped toy set (made by ``data/make_t5_toy.py``): 600 news sentences and headlines."""

DATA_SUFFIXES = {".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""

COLUMNS = ("source", "target")

# A hub dataset id: "name" or "owner/name".
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class DataSource:
    """Where the pairs come from.

    Attributes:
        kind: ``"file"`` (JSONL, CSV or Parquet), ``"disk"`` (a ``save_to_disk``
            directory) or ``"hub"`` (a Hugging Face Hub dataset id).
        location: The resolved path, or the hub id.
    """

    kind: str
    location: str


def resolve_source(data_path: str | Path | None) -> DataSource:
    """The :class:`DataSource` that ``data_path`` names (``None``: the toy set).

    An existing path is a file or a saved dataset; a value that looks like a path
    (absolute, ``./``, ``~``, a data suffix) must exist; anything else is a hub id.

    Raises:
        FileNotFoundError: a path-like value that does not exist.
        PipelineDefinitionError: a hub id while ``HF_HUB_OFFLINE`` is set, or a
            value that is neither a path nor a hub id.
    """
    if data_path is None:
        return DataSource("file", str(DEFAULT_DATA))
    path = Path(data_path).expanduser()
    if path.is_dir():
        return DataSource("disk", str(path.resolve()))
    if path.exists():
        return DataSource("file", str(path.resolve()))
    text = str(data_path)
    if (
        isinstance(data_path, Path)
        or path.is_absolute()
        or text.startswith((".", "~"))
        or path.suffix.lower() in DATA_SUFFIXES
    ):
        raise FileNotFoundError(f"data_path {text!r} does not exist")
    if not _HUB_NAME.fullmatch(text):
        raise PipelineDefinitionError(
            f"data_path {text!r} is neither an existing file or directory nor a hub dataset "
            "id ('name' or 'owner/name')"
        )
    if datasets.config.HF_HUB_OFFLINE:
        raise PipelineDefinitionError(
            f"data_path {text!r} is not a local file or directory, and the hub dataset of "
            "that name cannot be downloaded: HF_HUB_OFFLINE is set. Unset it, or pass a "
            "local JSONL/CSV/Parquet file or a save_to_disk directory"
        )
    return DataSource("hub", text)


def load_pairs(source: DataSource) -> datasets.Dataset:
    """The pairs of ``source``: a ``Dataset`` of the string columns ``source`` and ``target``.

    Other columns are dropped; numbers become their text. A ``DatasetDict``
    (saved or from the hub) gives its ``train`` split, or its only one.

    Raises:
        PipelineDefinitionError: naming ``source`` when it cannot be read, its
            format is unknown, a column is missing (named), a value is missing or
            blank (column and row named), or it has no rows.
    """
    what = f"data_path {source.location!r}"
    with quiet():
        return _checked_pairs(_load(source, what), what)


def _checked_pairs(raw: datasets.Dataset | datasets.DatasetDict, what: str) -> datasets.Dataset:
    if isinstance(raw, datasets.DatasetDict):
        raw = _one_split(raw, what)
    missing = [name for name in COLUMNS if name not in raw.column_names]
    if missing:
        raise PipelineDefinitionError(
            f"{what} has no {missing[0]!r} column (columns: {raw.column_names}); it needs "
            "'source' and 'target'"
        )
    pairs = raw.select_columns(list(COLUMNS))
    for name in COLUMNS:
        try:
            pairs = pairs.cast_column(name, datasets.Value("string"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError, ValueError) as exc:
            raise PipelineDefinitionError(
                f"{what}: column {name!r} cannot be read as text: {exc}"
            ) from exc
        values = pairs.data.column(name)
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
        row = pc.index(blank, True).as_py()
        if row >= 0:
            raise PipelineDefinitionError(
                f"{what}: column {name!r} is missing or empty in row {row} (0-based, header "
                "not counted); every row needs a source and a target"
            )
    if len(pairs) == 0:
        raise PipelineDefinitionError(f"{what} has no rows")
    return pairs


def fingerprint(source: DataSource, pairs: datasets.Dataset | None = None) -> str:
    """What identifies ``source``'s contents in the prefix key.

    A file: a hash of its bytes. A ``save_to_disk`` directory: its files' names
    and sizes and its JSON metadata (which holds the datasets' fingerprints). A
    hub dataset: its id and the loaded ``pairs``' fingerprint.
    """
    digest = hashlib.sha256()
    if source.kind == "file":
        with open(source.location, "rb") as fh:
            while chunk := fh.read(2**20):
                digest.update(chunk)
    elif source.kind == "disk":
        root = Path(source.location)
        for file in sorted(f for f in root.rglob("*") if f.is_file()):
            digest.update(f"{file.relative_to(root).as_posix()}:{file.stat().st_size}\n".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
    else:
        if pairs is None:
            raise ValueError("a hub dataset's fingerprint needs its loaded pairs")
        digest.update(f"{source.location}\n{pairs._fingerprint}".encode())
    return digest.hexdigest()[:16]


def _load(source: DataSource, what: str) -> datasets.Dataset | datasets.DatasetDict:
    if source.kind == "disk":
        try:
            return datasets.load_from_disk(source.location, keep_in_memory=True)
        except (FileNotFoundError, ValueError) as exc:
            raise PipelineDefinitionError(
                f"{what} is a directory but not a dataset written by save_to_disk: {exc}"
            ) from exc
    if source.kind == "hub":
        try:
            return datasets.load_dataset(source.location)
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise PipelineDefinitionError(
                f"{what} could not be loaded from the Hugging Face Hub: {exc}"
            ) from exc
    suffix = Path(source.location).suffix
    builder = DATA_SUFFIXES.get(suffix.lower())
    if builder is None:
        raise PipelineDefinitionError(
            f"{what}: unknown format {suffix!r}; use {', '.join(sorted(DATA_SUFFIXES))} "
            "(JSON Lines, CSV or Parquet), or a save_to_disk directory"
        )
    # A throwaway builder cache: the rows are kept in memory, and a stale entry
    # of the shared cache cannot stand in for a file edited in place.
    with tempfile.TemporaryDirectory(prefix="eeipu-t5-data-") as cache_dir:
        try:
            return datasets.load_dataset(
                builder,
                data_files=source.location,
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
            )
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, ValueError) as exc:
            raise PipelineDefinitionError(
                f"{what} could not be read as {builder}: {exc.__cause__ or exc}"
            ) from exc


def _one_split(dataset_dict: datasets.DatasetDict, what: str) -> datasets.Dataset:
    if "train" in dataset_dict:
        return dataset_dict["train"]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise PipelineDefinitionError(
        f"{what} holds the splits {list(dataset_dict)} and none is 'train'; save the split "
        "to use as a Dataset of its own"
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No ``datasets`` or ``transformers`` progress bars inside the block (one per
    dataset pass or model load, in every trial, would flood the logs)."""
    from transformers.utils import logging as transformers_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if transformers_bars:
            transformers_logging.enable_progress_bar()


def quiet_map(dataset: datasets.Dataset, function: Any, **kwargs: Any) -> datasets.Dataset:
    """``dataset.map(function, batched=True, ...)`` in memory, without progress bars."""
    with quiet():
        return dataset.map(function, batched=True, keep_in_memory=True, **kwargs)
