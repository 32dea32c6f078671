"""Shared helpers of the benchmark scripts: run an entry point, read its metrics.jsonl, summarise."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from nemo_dvpo.evaluation.curves import read_run_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_entry_point(script: str, overrides: list[str]) -> float:
    """Run ``python examples/<script> <overrides>`` in the repository; return its wall time in seconds.

    A benchmark run starts over in its run_dir (``overwrite=true``) unless it resumes.
    """
    keeps_run_dir = any(o.startswith(("resume=", "resume_from=", "overwrite=")) for o in overrides)
    fresh = [] if keeps_run_dir else ["overwrite=true"]
    command = [sys.executable, f"examples/{script}", *overrides, *fresh]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - started


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics records (a last line torn by a kill is dropped)."""
    return read_run_metrics(run_dir)


def median_of(records: list[dict], key: str) -> float:
    values = [record[key] for record in records if key in record]
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(script: str, ready_path: str, *overrides: str, log: Path | None = None,
                 repo: Path = REPO_ROOT) -> tuple[subprocess.Popen, str]:
    """``examples/<script>`` of the checkout ``repo`` (its own nemo_dvpo first on the path: another checkout, e.g. a
    ``git worktree`` of an older commit, can be measured with this one's client) on a free loopback port; returns
    the process and its address once ``ready_path`` answers."""
    import os
    import urllib.error
    import urllib.request

    port = free_port()
    output = open(log, "w") if log else subprocess.DEVNULL
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, f"examples/{script}", f"server.port={port}", *overrides],
                               cwd=repo, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{script} exited with {process.returncode} (log: {log})")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2):
                return process, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{script} did not become ready")


def start_gvm_server(gvm: str, *overrides: str, log: Path | None = None,
                     repo: Path = REPO_ROOT) -> tuple[subprocess.Popen, str]:
    """``examples/serve_gvm.py`` (of the checkout ``repo``) on a free loopback port; returns the process and its URL
    once it is ready."""
    return start_server("serve_gvm.py", "/v2/health/ready", f"gvm={gvm}", *overrides, log=log, repo=repo)


def stop_process(process: subprocess.Popen) -> None:
    import signal

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
