"""``torchrun`` with one clean line per failure instead of the launcher's traceback.

    python -m nemo_dvpo.launch --nproc-per-node 8 examples/train_dvpo.py model=llama3_8b ...

Takes exactly torchrun's arguments and runs the same elastic launcher. When a rank fails, the rank's
own error (printed once, by rank 0 or through torchelastic's error file) is the message; the launcher
then adds one line naming the rank and its exit status and exits with that status (2 for a user error,
75 for a run stopped on a signal with a checkpoint), where plain ``torchrun`` prints a Python traceback
of itself and a failure table. Plain ``torchrun`` works too.
"""

from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The agent logs each failed rank at ERROR with its pid and binary; the line below says it once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        # The agent SIGTERMs the ranks still running once one fails; under load their records can carry the
        # same (whole-second) timestamp as the rank that failed first. A rank that exited on its own is the cause.
        own_exits = {rank: failure for rank, failure in error.failures.items() if failure.exitcode >= 0}
        rank, failure = min((own_exits or error.failures).items(), key=lambda item: (item[1].timestamp, item[0]))
        status = failure.exitcode
        how = f"exit status {status}" if status >= 0 else f"signal {-status}"
        # Rank 0 prints its error before writing its error file: with the file there, it was printed.
        rank0 = error.failures.get(0)
        printed = rank0 is not None and bool(rank0.error_file_data)
        message = failure.message if isinstance(failure.message, str) and failure.error_file_data else ""
        detail = f": {message.strip()}" if message and not printed else ""
        print(f"{args.training_script}: rank {rank} failed with {how}{detail}", file=sys.stderr, flush=True)
        return status if 0 < status < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
