"""Load a nemo_dvpo checkpoint at a TP/PP layout and save it again from that layout.

    torchrun --nproc-per-node N resave_checkpoint.py --src DIR --dst DIR --tp T --pp P
"""

import argparse

import common

from nemo_dvpo.checkpointing.model_checkpoint import (
    load_hf_config_from_checkpoint,
    load_model_checkpoint,
    read_checkpoint_model_config,
    save_model_checkpoint,
)
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    model_cfg = read_checkpoint_model_config(args.src)
    initialize_distributed(ParallelConfig(args.tp, args.pp), num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    model, model_cfg, tokenizer = load_model_checkpoint(args.src)
    save_model_checkpoint(model, args.dst, model_cfg, load_hf_config_from_checkpoint(args.src), tokenizer)
    common.write_result({"saved": args.dst})


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    run_and_exit(main)
