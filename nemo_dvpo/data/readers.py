"""Records, one mapping each, from the places datasets live: a file, a folder, or the Hugging Face hub.

Supported sources (``format="auto"`` tells them apart):

* a ``.jsonl`` / ``.ndjson`` file (one JSON object per line; blank lines are skipped);
* a ``.json`` file holding a list of records (a ``.json`` file that is really JSON Lines also works);
* a ``.parquet`` file;
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` plus ``split``);
* a folder of data files - e.g. a downloaded hub snapshot with ``data/train_prefs-00000-of-00001.parquet`` -
  whose files are grouped into splits by name (``<split>.jsonl`` or ``<split>-*.parquet``);
* a hub id such as ``HuggingFaceH4/ultrafeedback_binarized`` (``datasets.load_dataset``; only where a hub
  is reachable).

Every record carries a ``where`` string (``data/train.jsonl:line 17 (row 16)``) so that whoever validates
it can say exactly which record is wrong. ``row`` is the 0-based record index within its file (or split),
``line`` the 1-based line number in a JSON Lines file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from nemo_dvpo.data.jsonl import first_invalid_utf8, invalid_utf8_message, iter_jsonl
from nemo_dvpo.utils.errors import NemoDvpoError

DataFormat = Literal["auto", "jsonl", "json", "parquet", "disk", "hub"]

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# Arrow tables are converted to Python rows this many at a time: bounded memory, few Python calls.
_ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class SourceRecord:
    """One record as read, before any validation.

    ``fields`` is the decoded record (a dict when the source is well-formed); ``decode_error`` is set
    instead when the record could not be decoded at all (a JSON Lines line that is not JSON).
    """

    fields: Any
    where: str
    decode_error: Optional[str] = None


def iter_source_records(path: str, format: DataFormat = "auto", split: Optional[str] = None) -> Iterator[SourceRecord]:
    """Yield the records of ``path`` in their stored order (files of a folder in sorted name order)."""
    resolved = _resolve_format(path, format)
    location = Path(os.path.expanduser(path))
    if resolved == "hub":
        yield from _iter_hub(path, split)
    elif resolved == "disk":
        yield from _iter_saved_dataset(location, path, split)
    elif location.is_dir():
        for file in _split_files(location, path, split, resolved):
            yield from _iter_file(file, _file_format(file))
    else:
        if split is not None:
            raise NemoDvpoError(f"{path}: a single {resolved} file has no splits, but split={split!r} was given")
        yield from _iter_file(location, resolved)


def _looks_like_hub_id(path: str) -> bool:
    return (path.count("/") == 1 and not path.startswith((".", "/", "~"))
            and Path(path).suffix.lower() not in _SUFFIX_FORMATS)


def _resolve_format(path: str, format: DataFormat) -> str:
    if not path:
        raise NemoDvpoError("no data path given")
    location = Path(os.path.expanduser(path))
    if format == "hub":
        return "hub"
    if not location.exists():
        if format == "auto" and _looks_like_hub_id(path):
            return "hub"
        raise NemoDvpoError(f"data path {path!r} does not exist")
    if location.is_dir():
        if format in ("auto", "disk") and _is_saved_dataset(location):
            return "disk"
        if format == "disk":
            raise NemoDvpoError(f"{path}: not a folder written by datasets' save_to_disk "
                                "(no dataset_dict.json or state.json)")
        return format
    if format == "disk":
        raise NemoDvpoError(f"{path}: format 'disk' needs a folder written by save_to_disk, got a file")
    if format == "auto":
        return _file_format(location)
    return format


def _file_format(file: Path) -> str:
    try:
        return _SUFFIX_FORMATS[file.suffix.lower()]
    except KeyError:
        raise NemoDvpoError(f"{file}: cannot tell the data format from the suffix {file.suffix!r}; expected one of "
                            f"{', '.join(_SUFFIX_FORMATS)} (or set the format explicitly)") from None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _split_of(file: Path) -> str:
    # Hub naming: "<split>-00000-of-00003.parquet"; plain naming: "<split>.jsonl".
    return file.name.split("-", 1)[0].split(".", 1)[0]


def _split_files(folder: Path, path: str, split: Optional[str], format: str) -> list[Path]:
    visible = sorted(f for f in folder.rglob("*") if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    # With format "auto" the first of parquet, jsonl, json present wins, so that a hub snapshot's
    # metadata (e.g. dataset_infos.json beside data/*.parquet) is not mistaken for data.
    for candidate in ("parquet", "jsonl", "json") if format == "auto" else (format,):
        files = [f for f in visible if _SUFFIX_FORMATS.get(f.suffix.lower()) == candidate]
        if files:
            break
    if not files:
        raise NemoDvpoError(f"{path}: folder holds no {'data' if format == 'auto' else format} files "
                            f"({', '.join(_SUFFIX_FORMATS)}) and is not a save_to_disk folder")
    splits = sorted({_split_of(f) for f in files})
    if split is None:
        if len(splits) > 1:
            raise NemoDvpoError(f"{path}: folder holds several splits ({', '.join(splits)}); set split to one of them")
        return files
    chosen = [f for f in files if _split_of(f) == split]
    if not chosen:
        raise NemoDvpoError(f"{path}: no data files for split {split!r}; the folder holds {', '.join(splits)}")
    return chosen


def _iter_file(file: Path, format: str) -> Iterator[SourceRecord]:
    if format == "jsonl":
        yield from _iter_jsonl(file)
    elif format == "json":
        yield from _iter_json(file)
    elif format == "parquet":
        yield from _iter_parquet(file)
    else:
        raise NemoDvpoError(f"{file}: format {format!r} is for folders or hub ids, not files")


def _iter_jsonl(file: Path) -> Iterator[SourceRecord]:
    for row, line in enumerate(iter_jsonl(file, "data file")):
        yield SourceRecord(line.value, f"{file}:line {line.number} (row {row})", decode_error=line.error)


def _iter_json(file: Path) -> Iterator[SourceRecord]:
    raw = file.read_bytes()
    bad_byte = first_invalid_utf8(raw)
    if bad_byte is not None:
        line_number = raw.count(b"\n", 0, bad_byte) + 1
        raise NemoDvpoError(f"{file}:{line_number}: {invalid_utf8_message(raw, bad_byte)}")
    text = raw.decode("utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            # Several top-level objects: JSON Lines under a .json name.
            yield from _iter_jsonl(file)
            return
        raise NemoDvpoError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise NemoDvpoError(f"{file}: expected a JSON list of records, got a {type(records).__name__}")
    for row, record in enumerate(records):
        yield SourceRecord(record, f"{file} (row {row})")


def _iter_parquet(file: Path) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise NemoDvpoError(f"{file}: not a readable Parquet file ({error})") from error
    row = 0
    for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH):
        for record in batch.to_pylist():
            yield SourceRecord(record, f"{file} (row {row})")
            row += 1


def _iter_dataset(dataset, label: str) -> Iterator[SourceRecord]:
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
        for record in table.to_pylist():
            yield SourceRecord(record, f"{label} (row {row})")
            row += 1


def _select_split(dataset, label: str, split: Optional[str]):
    """A ``Dataset`` as is (no split needed), or one split of a ``DatasetDict``."""
    if not hasattr(dataset, "keys"):
        if split is not None:
            raise NemoDvpoError(f"{label}: holds a single dataset without splits, but split={split!r} was given")
        return dataset, label
    splits = sorted(dataset.keys())
    if split is None:
        if len(splits) != 1:
            raise NemoDvpoError(f"{label}: holds several splits ({', '.join(splits)}); set split to one of them")
        split = splits[0]
    if split not in dataset:
        raise NemoDvpoError(f"{label}: no split {split!r}; it holds {', '.join(splits)}")
    return dataset[split], f"{label}[{split}]"


def _iter_saved_dataset(folder: Path, label: str, split: Optional[str]) -> Iterator[SourceRecord]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # a damaged folder raises FileNotFoundError, ArrowInvalid, JSONDecodeError, ...
        raise NemoDvpoError(f"{label}: could not load the saved dataset ({type(error).__name__}: {error})") from error
    dataset, label = _select_split(dataset, label, split)
    yield from _iter_dataset(dataset, label)


def _iter_hub(hub_id: str, split: Optional[str]) -> Iterator[SourceRecord]:
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as error:  # no network raises ConnectionError; an unknown id DatasetNotFoundError; ...
        raise NemoDvpoError(
            f"could not load {hub_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "If this machine has no hub access, download the dataset elsewhere and pass a local copy "
            "(a save_to_disk folder, a folder of Parquet/JSONL files, or one such file)."
        ) from error
    if split is None:  # load_dataset returned a DatasetDict: use it only if it has a single split
        dataset, label = _select_split(dataset, hub_id, None)
    else:  # load_dataset already selected the split
        label = f"{hub_id}[{split}]"
    yield from _iter_dataset(dataset, label)
