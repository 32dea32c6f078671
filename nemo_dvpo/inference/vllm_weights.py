"""The policy's weights as Hugging Face-named tensors, for a refit of the vLLM engine."""

from __future__ import annotations

from typing import Iterator

import torch

from nemo_dvpo.models.builder import make_bridge, without_data_parallel


def hf_weights_of(policy: list[torch.nn.Module], hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, tensor)`` of a Megatron policy at any TP/PP: collective over its model-parallel group.

    megatron-bridge's ``export_hf_weights`` gathers each parameter's tensor-parallel shards and receives the
    pipeline stage that holds it, so every rank gets whole HF tensors, one at a time (no full state dict is
    held); LoRA adapters are merged into their base weights on the way. Tensors are on the CPU. With tied
    embeddings ``lm_head.weight`` is left out: it is ``model.embed_tokens.weight`` (vLLM ties it itself).
    """
    bridge = make_bridge(hf_config, for_export=True)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, tensor in bridge.export_hf_weights(without_data_parallel(policy), cpu=True, show_progress=False):
            if tied and name == "lm_head.weight":
                continue
            yield name, tensor
