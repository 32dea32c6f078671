"""Weights streamed from a safetensors folder vs the same folder's HF model loaded first, at a TP/PP layout.

    torchrun --nproc-per-node N streamed_weights.py --folder HF_FOLDER --tp T --pp P [--precision bf16]

Every rank compares each of its Megatron parameters after ``load_hf_weights_into`` (the streamed path) with the
parameter after the bridge copied them from the instantiated HF model (``make_bridge(config, hf_model)``, the
path used before), bit for bit, and with a model as built (no parameter may keep its initial value); rank 0 writes
every rank's names that differ or were left as built, and how many were compared.
"""

import argparse
import dataclasses

import common  # the script's own folder is on sys.path when torchrun runs it
import torch
import torch.distributed as dist

from nemo_dvpo.models.builder import build_gpt_model, load_hf_weights_into, make_bridge
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.sources import load_hf_config, load_hf_model
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    hf_config = load_hf_config(args.folder)
    model_cfg = dataclasses.replace(ModelConfig.from_hf_config(hf_config), source=args.folder,
                                    precision=args.precision)
    initialize_distributed(ParallelConfig(args.tp, args.pp), num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    # A parameter a load missed keeps its initial value: a random one then differs between the two loaded builds,
    # a constant one (norms start at 1 in every build) equals this build's.
    as_built = build_gpt_model(model_cfg, hf_config=hf_config, load_weights=False)
    streamed = build_gpt_model(model_cfg, hf_config=hf_config, load_weights=False)
    load_hf_weights_into(streamed, args.folder, hf_config)
    instantiated = build_gpt_model(model_cfg, hf_config=hf_config, load_weights=False)
    make_bridge(hf_config, load_hf_model(args.folder)).load_hf_weights(instantiated)

    differing, left_as_built, compared = [], [], 0
    for chunk_streamed, chunk_instantiated, chunk_built in zip(streamed, instantiated, as_built):
        expected = dict(chunk_instantiated.named_parameters())
        built = dict(chunk_built.named_parameters())
        for name, param in chunk_streamed.named_parameters():
            compared += 1
            if param.dtype != expected[name].dtype or not torch.equal(param, expected[name]):
                differing.append(name)
            if torch.equal(param, built[name]):
                left_as_built.append(name)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"differing": differing, "left_as_built": left_as_built, "compared": compared,
                                      "dtypes": sorted({str(p.dtype) for p in streamed[0].parameters()})})
    common.write_result({"ranks": gathered})


if __name__ == "__main__":
    run_and_exit(main)
