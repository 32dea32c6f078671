"""JSON Lines, read one way everywhere: every fault names the file, the line and, for bad bytes, the byte offset.

Lines are decoded one at a time from bytes, so a file with a stray non-UTF-8 byte on line 812 says
exactly that instead of raising ``UnicodeDecodeError`` from deep inside a reader. Written whole and
atomically (:func:`write_jsonl`), or appended durably (:func:`append_jsonl`) by a builder that resumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from nemo_dvpo.utils.errors import NemoDvpoError
from nemo_dvpo.utils.paths import atomic_write_text


@dataclass(frozen=True)
class JsonlLine:
    """One non-blank line: its decoded value, or why it could not be decoded."""

    number: int  # 1-based line number
    offset: int  # byte offset of the line's first byte in the file
    value: Any = None
    error: Optional[str] = None


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path if it is a readable regular file, else a one-line error naming what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NemoDvpoError(f"{what} {path} does not exist")
    if path.is_dir():
        raise NemoDvpoError(f"{what} {path} is a folder; expected a file")
    return path


def first_invalid_utf8(raw: bytes) -> Optional[int]:
    """Index of the first byte of ``raw`` that is not valid UTF-8, or None."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    return None


def invalid_utf8_message(raw: bytes, index: int, file_offset: int = 0) -> str:
    return f"not valid UTF-8: byte 0x{raw[index]:02x} at byte offset {file_offset + index} of the file"


def iter_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[JsonlLine]:
    """Every non-blank line of a JSON Lines file, decoded, in order. Faults are reported per line."""
    path = require_file(path, what)
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            bad_byte = first_invalid_utf8(raw)
            if bad_byte is not None:
                yield JsonlLine(number, start, error=invalid_utf8_message(raw, bad_byte, start))
                continue
            try:
                yield JsonlLine(number, start, value=json.loads(raw.decode("utf-8")))
            except json.JSONDecodeError as error:
                yield JsonlLine(number, start, error=f"not valid JSON ({error.msg} at column {error.colno})")


def read_jsonl(path: str | Path, what: str = "JSONL file", tolerate_cut_last_line: bool = False) -> list[Any]:
    """All values of a JSON Lines file; the first bad line raises a one-line error naming it.

    ``tolerate_cut_last_line`` ignores a last line that is not valid JSON - what a writer killed in the
    middle of an append leaves (the resumable data builder's files).
    """
    lines = list(iter_jsonl(path, what))
    values = []
    for index, line in enumerate(lines):
        if line.error is not None:
            if tolerate_cut_last_line and index == len(lines) - 1 and line.error.startswith("not valid JSON"):
                break
            raise NemoDvpoError(f"{Path(path)}:{line.number}: {line.error}")
        values.append(line.value)
    return values


def _lines(records: Iterable[Mapping]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path: str | Path, records: Iterable[Mapping]) -> None:
    """One JSON object per line (UTF-8, not escaped), written atomically: a reader sees the old file or the new."""
    atomic_write_text(path, _lines(records))


def append_jsonl(path: str | Path, records: Sequence[Mapping]) -> None:
    """Append in one write, flushed to disk, so a crash loses at most these records (a cut last line is what
    ``read_jsonl(..., tolerate_cut_last_line=True)`` then ignores)."""
    if not records:
        return
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(_lines(records))
        handle.flush()
        os.fsync(handle.fileno())
