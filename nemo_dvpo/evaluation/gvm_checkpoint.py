"""Open a trained GVM checkpoint for evaluation: model, tokenizer and the data settings it used."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_metadata, read_checkpoint_model_config
from nemo_dvpo.utils.errors import CheckpointError


@dataclass
class LoadedGVM:
    model: list[torch.nn.Module]
    tokenizer: object
    eos_token_id: int
    pad_token_id: int
    chat_template: bool
    metadata: dict


def load_gvm(path: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
             precision: Optional[str] = None) -> LoadedGVM:
    """Collective: initialise distributed state for the layout and load the GVM at ``path``."""
    from nemo_dvpo.models.sources import load_tokenizer, special_token_ids
    from nemo_dvpo.checkpointing.model_checkpoint import load_value_model
    from nemo_dvpo.models.value_model import VALUE_MODEL_KINDS
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    metadata = read_checkpoint_metadata(path)
    # A reward model or a critic is read the same way (trunk + value head).
    if metadata["kind"] not in VALUE_MODEL_KINDS:
        raise CheckpointError(f"{path} holds a {metadata['kind']!r} checkpoint, not a value model (kind "
                              f"{' / '.join(VALUE_MODEL_KINDS)})")
    model_cfg = read_checkpoint_model_config(path)
    if precision is not None:
        model_cfg = dataclasses.replace(model_cfg, precision=precision)
    initialize_distributed(ParallelConfig(tensor_parallel, pipeline_parallel),
                           num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    model = load_value_model(model_cfg, init_from=path)
    if model_cfg.tokenizer is None:
        raise CheckpointError(f"GVM checkpoint {path} holds no tokenizer")
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    eos, pad = special_token_ids(tokenizer, model_cfg)
    return LoadedGVM(model=model, tokenizer=tokenizer, eos_token_id=eos, pad_token_id=pad,
                     chat_template=bool((metadata.get("gvm") or {}).get("chat_template", True)), metadata=metadata)
