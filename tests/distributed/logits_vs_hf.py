"""Megatron logits vs the Hugging Face model's at a given TP/PP layout.

    torchrun --nproc-per-node N logits_vs_hf.py --model {smollm2_135m,tiny} --tp T --pp P
"""

import argparse

import common  # the script's own folder is on sys.path when torchrun runs it
import torch

from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.forward import full_logits
from nemo_dvpo.models.sources import load_hf_model, load_tokenizer
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    model_cfg = load_model_config(args.model)
    if model_cfg.loads_weights:
        hf_model = load_hf_model(model_cfg.source)
        tokenizer = load_tokenizer(model_cfg.source)
        texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n"]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        tokens = encoded.input_ids
        real_token_mask = encoded.attention_mask.bool()
    else:
        hf_model = common.random_hf_model(model_cfg)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model_cfg.vocab_size, (3, 17), generator=generator)
        real_token_mask = torch.ones_like(tokens, dtype=torch.bool)

    model = common.megatron_from_hf(model_cfg, hf_model, ParallelConfig(args.tp, args.pp))
    megatron_logits = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits.float()
    # Logits at padding positions are never used; the fp32 noise there is reported separately.
    difference = (megatron_logits - hf_logits).abs()
    common.write_result({
        "max_abs_diff": difference[real_token_mask].max().item(),
        "max_abs_diff_with_padding": difference.max().item(),
        "logit_scale": hf_logits.abs().max().item(),
        "argmax_equal": bool((megatron_logits.argmax(-1) == hf_logits.argmax(-1)).all()),
        "shape": list(megatron_logits.shape),
    })


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    run_and_exit(main)
