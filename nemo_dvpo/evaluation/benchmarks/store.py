"""The evaluation's files: append-only JSON Lines caches and atomically written results.

``answers.jsonl`` and ``judgments.jsonl`` grow by whole records, each write flushed and fsynced, so a
killed run leaves every finished record and at most one half-written last line, which the next run
ignores and overwrites. Records are keyed by ``id``; a rerun skips the ids already present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from nemo_dvpo.data.jsonl import iter_jsonl
from nemo_dvpo.utils.errors import NemoDvpoError


class RecordFile:
    """One JSON Lines file of records with an ``id``; the last record of an id wins."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what

    def load(self) -> dict[Any, dict]:
        """Every complete record by id. A last line cut by a killed write is dropped from the file."""
        if not self.path.exists():
            return {}
        lines = list(iter_jsonl(self.path, self.what))
        records: dict[Any, dict] = {}
        for index, line in enumerate(lines):
            if line.error is not None:
                if index == len(lines) - 1 and line.error.startswith("not valid JSON"):
                    self._truncate(line.offset)
                    break
                raise NemoDvpoError(f"{self.path}:{line.number}: {line.error}")
            if not isinstance(line.value, dict) or "id" not in line.value:
                raise NemoDvpoError(f"{self.path}:{line.number}: expected a record with an 'id' field")
            records[record_key(line.value["id"])] = line.value
        if self.path.stat().st_size and not self._ends_with_newline():
            with open(self.path, "ab") as handle:  # a cut line that happened to be valid JSON
                handle.write(b"\n")
        return records

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def _truncate(self, offset: int) -> None:
        with open(self.path, "r+b") as handle:
            handle.truncate(offset)

    def append(self, records: Iterable[dict]) -> None:
        """Append whole records and make them durable before returning."""
        payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not payload:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())


def record_key(record_id: Any) -> str:
    """How ids are compared: as strings (JSON keeps ints and strings apart; the benchmarks use both)."""
    return str(record_id)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path``."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
