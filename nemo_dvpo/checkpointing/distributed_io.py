"""Writing and reading megatron-core distributed checkpoints, with our guarantees at the boundary.

* **No helper processes.** megatron-core's ``torch_dist`` writer starts a ``multiprocessing`` Manager
  (a spawned interpreter that re-imports the training script: 450-650 MB) plus its resource tracker on
  the first save, and forks one writer process per file on every save. A killed run leaves those
  behind, and a Slurm node collects them job after job. :class:`InProcessSaveStrategy` writes the same
  ``torch_dist`` files from the calling process.
* **Errors that say what to do.** A damaged checkpoint (a shard missing or cut short, ``.metadata``
  missing, a state that does not fit the model) is reported with the file and the folder instead of a
  torch traceback: :func:`verify_distributed_checkpoint` checks every shard file against the sizes its
  ``.metadata`` records before loading.
* **Disk space.** :func:`state_dict_nbytes` sizes a save so that a full disk is refused with the
  number of bytes it needed before anything is written.
"""

from __future__ import annotations

import errno
import queue
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_dvpo.utils.errors import CheckpointError

MEGATRON_METADATA = "metadata.json"
TORCH_METADATA = ".metadata"


def _in_process_write(transform_list, use_msc, rank, write_buckets, results_queue) -> None:
    """Write every bucket of this rank in this process (megatron forks one process per bucket)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    local_results: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    results: dict[int, Any] = {}
    for index, bucket in enumerate(write_buckets):
        # ``write_preloaded_data`` reports through a results queue and marks a counter queue done.
        done.put(index)
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local_results, done,
                                                   use_fsync=True, use_msc=use_msc)
        local_index, result = local_results.get()
        if isinstance(result, Exception):
            results_queue.put(result)
            return
        results[local_index] = result
    results_queue.put(results)


def in_process_save_strategy():
    """megatron-core's ``torch_dist`` save strategy, writing from the calling process (one file per rank)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir) -> AsyncRequest:
            # The writer fetches its results queue from this module-level cache; a plain in-process
            # queue there means the Manager process is never spawned.
            if filesystem_async._results_queue is None:
                filesystem_async._results_queue = queue.Queue()
            request = super().async_save(sharded_state_dict, checkpoint_dir)
            if request.async_fn is None:
                return request
            transform_list, use_msc = request.async_fn.args
            return request._replace(async_fn=lambda *args: _in_process_write(transform_list, use_msc, *args))

    return InProcessSaveStrategy("torch_dist", 1, thread_count=1)


def state_dict_nbytes(sharded_state_dict) -> int:
    """Bytes this rank writes for ``sharded_state_dict`` (main replicas of its sharded tensors)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(sharded_state_dict):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and torch.is_tensor(value.data):
            if isinstance(value, ShardedTensorFactory) or is_main_replica(value.replica_id):
                total += value.data.numel() * value.data.element_size()
    return total


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or anything it wraps, is an out-of-space error."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        stack.extend([current.__cause__, current.__context__])
        # torch DCP wraps per-rank failures in CheckpointException(failures={rank: exception}).
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            stack.extend(failure for failure in failures.values() if isinstance(failure, BaseException))
    return False


def save_distributed(sharded_state_dict, folder: Path) -> None:
    """Collective: write a megatron-core distributed checkpoint into ``folder`` (which exists)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(folder), sharded_strategy=in_process_save_strategy())


def verify_distributed_checkpoint(folder: Path, label: str) -> None:
    """Refuse a distributed checkpoint whose files are missing or cut short, naming the file.

    ``label`` names the checkpoint in messages (e.g. ``runs/gvm/checkpoints/step_0000004``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder.name}/ is missing")
    for name in (MEGATRON_METADATA, TORCH_METADATA):
        if not (folder / name).is_file():
            raise CheckpointError(f"{label}: {folder.name}/{name} is missing")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as error:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise CheckpointError(f"{label}: {folder.name}/{TORCH_METADATA} is damaged "
                              f"({type(error).__name__}: {error})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative_path, size in sorted(needed.items()):
        path = folder / relative_path
        if not path.is_file():
            raise CheckpointError(f"{label}: {folder.name}/{relative_path} is missing")
        actual = path.stat().st_size
        if actual < size:
            raise CheckpointError(f"{label}: {folder.name}/{relative_path} is truncated "
                                  f"({actual} of {size} bytes)")


def load_distributed(sharded_state_dict, folder: Path, label: str) -> dict:
    """Collective: load ``folder`` into the layout of ``sharded_state_dict``; failures name the checkpoint."""
    from megatron.core import dist_checkpointing
    # torch's CheckpointException derives from BaseException, not Exception (a missing key in the checkpoint
    # arrives as one), so it is named here or it would escape the message below.
    from torch.distributed.checkpoint.api import CheckpointException

    verify_distributed_checkpoint(folder, label)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(folder))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:
        cause = _first_rank_failure(error)
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"{label}: {folder.name}/ could not be loaded into this model "
                              f"({type(cause).__name__}: {detail[:400]})") from error


def _first_rank_failure(error: BaseException) -> BaseException:
    """The exception a rank raised inside torch's CheckpointException (whose own message is only the rank list)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) and first else first
        if isinstance(first, BaseException):
            return first
    return error


def free_bytes(path: Path) -> Optional[int]:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    import shutil

    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
