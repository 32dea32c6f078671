"""LoRA at a tensor-parallel layout: adapters off equal the base model, the merged model and its HF export compute
the adapted model's logits (the merge gathers the adapter shards that the layer's own shard needs).

    torchrun --nproc-per-node N lora_tp.py HF_EXPORT_DIR
"""

import os
import sys
from pathlib import Path

import common  # the script's own folder is on sys.path when torchrun runs it
import torch
import torch.distributed as dist

from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.checkpointing.conversion import export_model_to_hf
from nemo_dvpo.models.forward import full_logits
from nemo_dvpo.models.lora import LoRAConfig, adapter_modules, adapters_disabled, apply_lora, merge_adapters
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    export_dir = Path(sys.argv[1])
    model_cfg = load_model_config("tiny")
    hf_model = common.random_hf_model(model_cfg)
    tp = int(os.environ["WORLD_SIZE"])
    model = common.megatron_from_hf(model_cfg, hf_model, ParallelConfig(tp, 1))
    tokens = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(3))
    base = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    apply_lora(model, LoRAConfig(enabled=True, dim=4))
    # Each rank's B shard differs (seeded by rank): a merge that used the wrong shard would show.
    generator = torch.Generator().manual_seed(5 + dist.get_rank())
    with torch.no_grad():
        for module in adapter_modules(model):
            module.adapter.linear_out.weight.copy_(0.05 * torch.randn(module.adapter.linear_out.weight.shape,
                                                                      generator=generator))
    adapted = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    with adapters_disabled(model):
        off = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    merge_adapters(model)
    merged = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    export_model_to_hf(model, hf_model.config, load_tokenizer(model_cfg.tokenizer_source), export_dir)
    result = {"adapters_off_equal_base": bool(torch.equal(off, base)),
              "adapted_minus_base": (adapted - base).abs().max().item(),
              "merged_minus_adapted": (merged - adapted).abs().max().item(),
              "logit_scale": adapted.abs().max().item()}
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            exported = AutoModelForCausalLM.from_pretrained(export_dir).eval()(tokens).logits.float()
        result["export_minus_adapted"] = (exported - adapted).abs().max().item()
        common.write_result(result)


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    run_and_exit(main)
