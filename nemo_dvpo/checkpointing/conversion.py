"""Hugging Face <-> Megatron conversion (megatron-bridge mappings, nemo_dvpo checkpoint format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nemo_dvpo.checkpointing.model_checkpoint import (
    EXPORT_MARKER_FILE,
    AtomicCheckpointDir,
    is_our_layout,
    write_json_atomic,
    load_hf_config_from_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)
from nemo_dvpo.models.builder import build_gpt_model, make_bridge, without_data_parallel
from nemo_dvpo.models.config import ModelConfig, available_presets, load_model_config
from nemo_dvpo.models.sources import load_hf_config, load_tokenizer
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.utils.errors import NemoDvpoError
from nemo_dvpo.utils.paths import check_replaceable_dir

_SHARD_BYTES = 2 * 1024**3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_hf_source(hf_path: str) -> str:
    """Accept a preset name (``smollm2_135m``) as shorthand for the preset's weight source."""
    if hf_path in available_presets() and not Path(hf_path).exists():
        source = load_model_config(hf_path).source
        if source is None:
            raise NemoDvpoError(f"preset {hf_path!r} has no weight source (it is random-init only)")
        return source
    return hf_path


def check_tokenizer_matches(tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range at run time."""
    if len(tokenizer) > vocab_size:
        raise NemoDvpoError(
            f"the tokenizer from {where} has {len(tokenizer)} tokens but the checkpoint's vocabulary has "
            f"{vocab_size} entries: they do not belong together"
        )


def convert_hf_to_megatron(hf_path: str, megatron_path: str | Path, parallel: Optional[ParallelConfig] = None,
                           tokenizer_path: Optional[str] = None, name: Optional[str] = None,
                           precision: str = "fp32", overwrite: bool = False) -> Path:
    """Collective: load an HF folder / hub id / GGUF file and save it as a nemo_dvpo Megatron checkpoint.

    An existing non-empty ``megatron_path`` is refused unless ``overwrite``, and even then only a
    nemo_dvpo checkpoint is replaced.
    """
    check_replaceable_dir(megatron_path, overwrite, is_our_layout, what="--megatron-path",
                          ours_description="a nemo_dvpo checkpoint")
    source = resolve_hf_source(hf_path)
    hf_config = load_hf_config(source)
    model_cfg = ModelConfig.from_hf_config(hf_config, name=name or Path(str(hf_path)).stem,
                                           source=source, precision=precision)
    parallel = parallel or ParallelConfig()
    initialize_distributed(parallel, num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    tokenizer = load_tokenizer(tokenizer_path or source)
    check_tokenizer_matches(tokenizer, model_cfg.vocab_size, tokenizer_path or hf_path)
    model = build_gpt_model(model_cfg, hf_config=hf_config)
    return save_model_checkpoint(model, megatron_path, model_cfg, hf_config, tokenizer,
                                 extra={"converted_from": str(hf_path)})


def _write_safetensors_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Write HF-style safetensors shards plus the index ``from_pretrained`` expects."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > _SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_megatron_to_hf(megatron_path: str | Path, hf_path: str | Path,
                          parallel: Optional[ParallelConfig] = None, dtype: str = "float32",
                          overwrite: bool = False) -> Path:
    """Collective: export a nemo_dvpo Megatron checkpoint to an HF folder (weights, config, tokenizer).

    An existing non-empty ``hf_path`` is refused unless ``overwrite``, and even then only a folder
    that nemo_dvpo exported is replaced.
    """
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config

    if dtype not in _DTYPES:
        raise NemoDvpoError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    check_replaceable_dir(hf_path, overwrite, is_our_layout, what="--hf-path",
                          ours_description="a Hugging Face folder nemo_dvpo exported")
    model_cfg = read_checkpoint_model_config(megatron_path)
    parallel = parallel or ParallelConfig()
    initialize_distributed(parallel, num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    model, model_cfg, tokenizer = load_model_checkpoint(megatron_path)
    hf_config = load_hf_config_from_checkpoint(megatron_path)
    hf_config.torch_dtype = _DTYPES[dtype]
    return export_model_to_hf(model, hf_config, tokenizer, hf_path, dtype=dtype,
                              hf_artifacts=Path(megatron_path) / "hf", exported_from=str(megatron_path))


def export_model_to_hf(model: list[torch.nn.Module], hf_config, tokenizer, hf_path: str | Path,
                       dtype: str = "float32", hf_artifacts: Optional[Path] = None,
                       exported_from: Optional[str] = None) -> Path:
    """Collective: write an in-memory Megatron model as an HF folder that transformers and vLLM load."""
    from nemo_dvpo.checkpointing.model_checkpoint import save_hf_artifacts

    bridge = make_bridge(hf_config, for_export=True)
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        # Collective: every rank receives full tensors; only rank 0 keeps them.
        for name, tensor in bridge.export_hf_weights(without_data_parallel(model), cpu=True,
                                                     show_progress=is_writer):
            if is_writer:
                tensors[name] = tensor.detach().to(_DTYPES[dtype]).clone()
    if hf_config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    with AtomicCheckpointDir(hf_path) as staging:
        if is_writer:
            _write_safetensors_shards(tensors, staging)
            if hf_artifacts is not None and hf_artifacts.exists():
                for item in hf_artifacts.iterdir():
                    if item.name != "config.json":
                        shutil.copy2(item, staging / item.name)
                hf_config.save_pretrained(staging)
            else:
                save_hf_artifacts(staging, hf_config, tokenizer)
            # Marks the folder as ours: a later export may replace it, never a folder a user made.
            write_json_atomic(staging / EXPORT_MARKER_FILE, {"format_version": 1, "dtype": dtype,
                                                            "exported_from": exported_from})
    return Path(hf_path)
