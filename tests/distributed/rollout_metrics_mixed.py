"""rollout_metrics on 2 data-parallel ranks with a mixed prompt file: rank 0's prompts carry IFEval
instructions (verifiable), rank 1's are plain. The reductions are the real ones (DataParallel over gloo, the
IFEval checkers); only the run around them is a stand-in.

Usage: rollout_metrics_mixed.py   (rank 0 writes what both ranks computed)
"""

from __future__ import annotations

from common import write_result


def main() -> None:
    import types

    import torch
    import torch.distributed as dist

    from nemo_dvpo.rlhf.metrics import rollout_metrics
    from nemo_dvpo.rlhf.rollout import Sample
    from nemo_dvpo.rlhf.trajectory import Trajectory
    from nemo_dvpo.training.data_parallel import DataParallel
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig())
    rank = dist.get_rank()
    # Rank 0: two rows, responses at positions 2-3 and 1-3; rank 1: one row, response at positions 1-2.
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]] if rank == 0 else [[0, 1, 1, 0]], dtype=torch.bool)
    old = torch.where(mask, torch.full(mask.shape, -1.0 - rank), torch.zeros(mask.shape))
    ref = torch.where(mask, torch.full(mask.shape, -1.5), torch.zeros(mask.shape))
    values = torch.where(mask, torch.full(mask.shape, 2.0 * (rank + 1)), torch.zeros(mask.shape))
    lengths = mask.long().cumsum(1).argmax(1) + 1  # last response position + 1
    trajectory = Trajectory(torch.zeros(mask.shape, dtype=torch.long), mask, lengths, old, ref, values,
                            advantages=values.clone())
    no_comma = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "prompt": "p"}
    if rank == 0:
        records, texts = [no_comma, no_comma], ["fine and dandy", "one, two"]
    else:
        records, texts = [{"prompt": "plain"}], ["anything, at all"]
    sample = Sample(generation=types.SimpleNamespace(response_texts=texts), old_logprobs=old)
    metrics = rollout_metrics(sample, trajectory, records, "gvm_value", DataParallel.from_parallel_state(), kl_coef=0.1)
    gathered = [None] * 2
    dist.all_gather_object(gathered, metrics)
    write_result({"ranks": gathered})


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
