"""User-facing errors and exit statuses: a clear message naming what was wrong, without a traceback wall.

Exit statuses of every entry point (``examples/``, ``tools/``):

==== ==========================================================================================
0    finished
2    the input was wrong (a path, a config field, a data record, a damaged checkpoint): one line
     on stderr says what and where
75   stopped early by SIGTERM, SIGINT or SIGUSR1 after saving a checkpoint; ``resume=true``
     continues exactly (75 is sysexits' EX_TEMPFAIL: "try again later" - a requeue, for Slurm)
128+N killed by a second signal N before the stop finished (no new checkpoint)
==== ==========================================================================================

Every entry point that loads the library ends through :func:`run_and_exit`, which skips the interpreter's teardown
once the work is done.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time
from typing import Callable, NoReturn, TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75


class NemoDvpoError(Exception):
    """An error caused by the user's input (a path, a config field, a data record)."""


class ConfigError(NemoDvpoError):
    """A configuration field has a missing, wrong-typed or inconsistent value."""


class CheckpointError(NemoDvpoError):
    """A checkpoint is missing, incomplete or does not match the requested model."""


class TrainingStopped(Exception):
    """A run stopped early on a signal after saving a checkpoint; the message says how to resume."""


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")  # not imported: not initialised (an error before torch loads)
    if dist is not None and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def report_failure(message: str) -> None:
    """Print ``message`` once per job rather than once per rank.

    Rank 0 prints it. Every rank also leaves it in torchelastic's error file where torchrun asked for
    one (``TORCHELASTIC_ERROR_FILE``), so the launcher's failure report names the cause even when
    only another rank failed.
    """
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as handle:
                json.dump({"message": message, "timestamp": int(time.time())}, handle)
        except OSError:
            pass


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point: user errors print one line and exit 2; a signal-stopped run exits 75."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except NemoDvpoError as error:
            report_failure(f"error: {error}")
            sys.exit(EXIT_USER_ERROR)
        except TrainingStopped as stopped:
            report_failure(str(stopped))
            sys.exit(EXIT_STOPPED)

    return wrapper  # type: ignore[return-value]


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run an entry point's ``main`` and end the process with its exit status, without the interpreter's teardown.

    With torch, megatron-core (which imports torch._dynamo and inductor) and transformers loaded, Python's own
    teardown - clearing thousands of modules and collecting their objects - takes 1-3 s of CPU after the work is done,
    in every rank of every launch (docs/benchmarks.md, "Test suite on the AVX2-only CPU again": 1.8 s less per run of
    train_gvm.py). A finished entry point needs none of it: atexit handlers still run here (logging,
    multiprocessing's children, TensorBoard), the standard streams are flushed, and the library closes the files it
    writes. The status is ``main``'s return value when that is an int (else 0) or a ``SystemExit``'s code (the
    statuses above). Any other exception takes Python's usual path (traceback, status 1, full teardown), and so does
    a process with a non-daemon thread alive, which Python waits for.
    """
    try:
        returned = main()
        status = returned if isinstance(returned, int) else 0
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            raise  # a message: Python prints it and exits 1
        status = stop.code or 0
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()  # what Py_Finalize runs first; the rest of its work is the teardown skipped here
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)
