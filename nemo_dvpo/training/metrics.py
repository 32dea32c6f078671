"""Metrics: TensorBoard scalars and a JSONL log on rank 0, a progress bar, peak memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from nemo_dvpo.data.jsonl import iter_jsonl
from nemo_dvpo.utils.distributed import is_rank_zero
from nemo_dvpo.utils.errors import NemoDvpoError


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU, since it started or since
    the last :func:`reset_peak_memory`."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is the address space's high-water mark, which reset_peak_memory resets. ru_maxrss is not always: the
    # kernel folds it with the high-water mark recorded when any thread of the process exited, which no reset
    # clears (a process whose threads came and went reported its old peak after the reset).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_memory() -> None:
    """Start measuring the peak afresh, so that each stage of a run (a GVM trained first, then the policy) reports
    its own: the caching allocator's peak on a GPU; on Linux the process's resident high-water mark, which
    writing 5 to ``/proc/self/clear_refs`` resets (``ru_maxrss`` follows it). Elsewhere the peak stays the
    process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class MetricsLogger:
    """Writes ``{step, metrics}`` to TensorBoard and ``metrics.jsonl`` under ``run_dir`` (rank 0 only).

    The JSONL file is appended to, so a resumed run continues the same log; entries after the resume
    step are dropped first so that the log shows each step once (:func:`records_up_to`).
    """

    def __init__(self, run_dir: str | Path, resume_step: Optional[int] = None):
        self.enabled = is_rank_zero()
        self.writer = None
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl_path.exists():
            kept = records_up_to(self.jsonl_path, resume_step)
            self.jsonl_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif resume_step is None and self.jsonl_path.exists():
            self.jsonl_path.unlink()
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def records_up_to(path: Path, step: int) -> list[dict]:
    """The records of ``path`` (a ``metrics.jsonl``) logged at or before ``step``, for a resume.

    A run killed while appending leaves its last line cut short (``{"step": 99, "train/lo``); that line is
    dropped with a one-line notice - the resumed run logs that step again. Any other unreadable line is an
    error naming the file and line, since something other than a kill wrote it.
    """
    lines = list(iter_jsonl(path, "metrics file"))
    if lines and lines[-1].error is not None and lines[-1].error.startswith("not valid JSON"):
        print(f"[metrics] {path}:{lines[-1].number}: dropped a torn last line (a run killed while writing it)",
              file=sys.stderr, flush=True)
        lines.pop()
    records = []
    for line in lines:
        if line.error is not None:
            raise NemoDvpoError(f"{path}:{line.number}: {line.error}")
        if not isinstance(line.value, dict) or not isinstance(line.value.get("step"), int):
            raise NemoDvpoError(f"{path}:{line.number}: not a metrics record (an object with an integer 'step')")
        if line.value["step"] <= step:
            records.append(line.value)
    return records


def progress_bar(total: int, initial: int = 0, description: str = ""):
    """A tqdm bar on rank 0 (on stderr); other ranks get a silent stand-in with the same methods."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=not is_rank_zero(),
                dynamic_ncols=True, file=sys.stderr)


def _synchronize() -> None:
    """On a GPU, wait for the queued kernels: otherwise a phase's work is billed to whichever phase next waits."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall time of a step (``time/step_s``, from the timer's creation) and of its phases
    (``time/<phase>_s``): ``with timer("generation"): ...``."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, generated_tokens=None) -> dict[str, float]:
        """The phases' times, the generation throughput (given the step's generated tokens) and peak memory."""
        metrics = {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}
        metrics["time/step_s"] = time.perf_counter() - self.started
        if generated_tokens is not None and self.seconds.get("generation"):
            metrics["perf/generated_tokens_per_s"] = float(generated_tokens) / self.seconds["generation"]
        metrics["perf/peak_memory_mib"] = peak_memory_mib()
        if torch.cuda.is_available():
            # What the caching allocator holds: the figure that decides whether a larger batch fits.
            metrics["perf/peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        return metrics
