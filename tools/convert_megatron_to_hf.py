"""Export a nemo_dvpo Megatron checkpoint (saved at any TP/PP) to a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --megatron-path checkpoints/smollm2_135m --hf-path exported/smollm2

The folder holds safetensors weights, config.json, generation_config.json and the tokenizer with its
chat template: ``transformers`` and vLLM load it directly.
"""

from __future__ import annotations

import argparse

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-path", required=True, help="nemo_dvpo Megatron checkpoint folder")
    parser.add_argument("--hf-path", required=True, help="output Hugging Face folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder (only one that nemo_dvpo wrote)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.checkpointing.conversion import export_megatron_to_hf
    from nemo_dvpo.utils.distributed import ParallelConfig, destroy_distributed, print_rank_zero

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel,
                              pipeline_model_parallel_size=args.pipeline_parallel)
    path = export_megatron_to_hf(args.megatron_path, args.hf_path, parallel=parallel, dtype=args.dtype,
                                 overwrite=args.overwrite)
    print_rank_zero(f"saved Hugging Face model to {path}")
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
