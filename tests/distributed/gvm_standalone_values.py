"""GVM values when the GVM runs on its own process groups at another TP size than the global layout.

Usage: gvm_standalone_values.py GVM_CHECKPOINT GLOBAL_TP GVM_TP   (world size 2)

Each rank brings the batch of its global data-parallel rank (shapes differ between them). The values
from the GVM at its own layout must equal those from the GVM at the global layout.
"""

from __future__ import annotations

import sys

from common import write_result


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    import nemo_dvpo  # noqa: F401
    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.checkpointing.model_checkpoint import load_value_model
    from nemo_dvpo.models.value_model import token_values
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed, standalone_model_groups

    checkpoint, global_tp, gvm_tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model_cfg = load_model_config("tiny")
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=global_tp))
    dp_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(100 + dp_rank)
    tokens = torch.randint(0, model_cfg.vocab_size, (2 + dp_rank, 9 + 4 * dp_rank), generator=generator)

    at_global_layout = load_value_model(model_cfg, init_from=checkpoint)
    expected = token_values(at_global_layout, tokens)
    groups = standalone_model_groups(gvm_tp)
    standalone = load_value_model(model_cfg, init_from=checkpoint, pg_collection=groups)
    actual = token_values(standalone, tokens, micro_batch_size=2, pg_collection=groups)

    same_shape = actual.shape == expected.shape
    max_diff = torch.tensor([(actual - expected).abs().max().item() if same_shape else float("inf")])
    dist.all_reduce(max_diff, op=dist.ReduceOp.MAX)
    gpt = unwrap_model(standalone[0])
    write_result({
        "max_abs_diff": max_diff.item(),
        "value_scale": expected.abs().max().item(),
        "gvm_qkv_rows": gpt.decoder.layers[0].self_attention.linear_qkv.weight.shape[0],
        "global_qkv_rows":
            unwrap_model(at_global_layout[0]).decoder.layers[0].self_attention.linear_qkv.weight.shape[0],
    })


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
