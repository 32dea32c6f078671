"""gloo scatter of non-contiguous column chunks (what megatron-bridge does for row-parallel weights)."""

import common
import torch
import torch.distributed as dist

import nemo_dvpo  # noqa: F401  (applies the CPU layer, including the contiguity fix)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    chunks = list(torch.chunk(full, world, dim=1))
    assert not chunks[0].is_contiguous()
    received = torch.empty(6, 8 // world)
    dist.scatter(received, chunks if rank == 0 else None, src=0)
    ok = torch.tensor([float(torch.equal(received, chunks[rank]))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    common.write_result({"received_equals_sent": bool(ok.item() == 1.0)})
    dist.destroy_process_group()


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
