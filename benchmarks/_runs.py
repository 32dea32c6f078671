"""Shared helpers of the benchmark scripts: run an entry point, read its metrics.jsonl, summarise."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_entry_point(script: str, overrides: list[str]) -> float:
    """Run ``python examples/<script> <overrides>`` in the repository; return its wall time in seconds."""
    command = [sys.executable, f"examples/{script}", *overrides]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - started


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def median_of(records: list[dict], key: str) -> float:
    values = [record[key] for record in records if key in record]
    return statistics.median(values) if values else float("nan")
