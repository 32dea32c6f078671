"""Stop a training run cleanly on a signal: finish the step, save a checkpoint, exit with status 75.

Slurm sends SIGTERM at a time limit or preemption (then SIGKILL after a grace period) and, with
``--signal=USR1@SECONDS``, SIGUSR1 ahead of the limit; a person sends SIGINT with Ctrl-C. Each of
them only *requests* a stop: Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the
interpreter happens to be - inside a collective, a checkpoint write or logging's lock handling (where
it is swallowed) - so the handler here just sets a flag. The training loop asks :meth:`GracefulStop.
should_stop` at step boundaries; every rank asks at the same points and the answer is reduced over all
ranks, so one rank's signal stops every rank after the same step, and no rank waits in a collective the
others left. A second signal exits at once (status 128 + signal number): the last complete checkpoint
stays the one to resume from, since saves are atomic.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class GracefulStop:
    """Signal handlers that turn SIGTERM / SIGINT / SIGUSR1 into a stop request at the next step boundary.

    Use as a context manager around a run; the previous handlers come back on exit. Handlers can only
    be installed from the main thread; elsewhere (a test harness thread) the object stays inert.
    """

    def __init__(self, action: str = "stopping after the current step with a checkpoint"):
        # What the process does on the first signal (printed when it arrives).
        self.action = action
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}
        self._depth = 0

    def __enter__(self) -> "GracefulStop":
        # Re-entrant: an entry point installs it before loading models, the recipe's loop enters it again.
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        self._depth -= 1
        if self._depth == 0:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            # A second signal: the user (or the scheduler) will not wait for the checkpoint.
            os.write(2, f"\n{name} again: exiting now, without a new checkpoint\n".encode())
            os._exit(128 + signum)
        self.signal_name = name
        os.write(2, f"\n{name} received: {self.action} (send it again to exit at once)\n".encode())

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal (no communication)."""
        return self.signal_name is not None

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal.

        Call it at the same points of the loop on every rank of the job.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        from nemo_dvpo.utils.distributed import all_reduce_on_device

        flag = torch.tensor([1.0 if self.requested else 0.0])
        flag = all_reduce_on_device(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        return bool(flag.item() > 0)


def stopped_message(tag: str, signal_name: str, completed: int, total: int, checkpoint) -> str:
    """Where a run stopped and how to continue it (printed by the entry point, which exits 75)."""
    where = f"after step {completed} of {total}" if completed else "before the first step"
    saved = f"checkpoint {checkpoint}" if checkpoint is not None else "nothing to save yet"
    return (f"[{tag}] stopped by {signal_name} {where}: {saved}. Run the same command with resume=true to "
            f"continue (exit status 75)")
