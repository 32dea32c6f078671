"""Convert a Hugging Face model (folder, hub id, .gguf file or preset name) to a Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path smollm2_135m --megatron-path checkpoints/smollm2_135m
    torchrun --nproc-per-node 2 tools/convert_hf_to_megatron.py --hf-path /models/Llama-3.2-3B \\
        --megatron-path checkpoints/llama3_2_3b --tensor-parallel 2

The result is a distributed (reshardable) checkpoint: it loads at any TP/PP layout.
"""

from __future__ import annotations

import argparse

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", required=True,
                        help="HF model folder, hub id, .gguf file, package://pkg/file.gguf, or a preset name")
    parser.add_argument("--megatron-path", required=True, help="output checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder (only one that nemo_dvpo wrote)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source if not the model's own")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision the checkpoint is built and stored in")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.checkpointing.conversion import convert_hf_to_megatron
    from nemo_dvpo.utils.distributed import ParallelConfig, destroy_distributed, print_rank_zero

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel,
                              pipeline_model_parallel_size=args.pipeline_parallel)
    path = convert_hf_to_megatron(args.hf_path, args.megatron_path, parallel=parallel,
                                  tokenizer_path=args.tokenizer, precision=args.precision, overwrite=args.overwrite)
    print_rank_zero(f"saved Megatron checkpoint to {path}")
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
