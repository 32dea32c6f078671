"""DataParallel reductions on 2 ranks: rank 0 holds verifiable rollouts, rank 1 none (a mixed prompt file).

Usage: data_parallel_metrics.py   (rank 0 writes what both ranks computed)
"""

from __future__ import annotations

from common import write_result


def main() -> None:
    import torch.distributed as dist

    import nemo_dvpo  # noqa: F401
    from nemo_dvpo.training.data_parallel import DataParallel
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig())
    data_parallel = DataParallel.from_parallel_state()
    rank = data_parallel.rank
    # Rank 0: two verifiable rollouts scoring 0.5 and 1.0; rank 1: four plain ones. A metric no rank has
    # (count 0 everywhere) must be left out on both ranks alike.
    numerators = {"verifiable_score": 1.5 if rank == 0 else 0.0, "kl": 2.0 + rank, "never": 0.0}
    denominators = {"verifiable_score": 2.0 if rank == 0 else 0.0, "kl": 4.0, "never": 0.0}
    ratios = data_parallel.ratio(numerators, denominators)
    means = data_parallel.mean({"a": float(rank), "b": 10.0 * rank})
    shards = data_parallel.shard(list(range(8)))
    gathered = [None] * 2
    dist.all_gather_object(gathered, {"ratios": ratios, "means": means, "shards": shards})
    write_result({"ranks": gathered})


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
