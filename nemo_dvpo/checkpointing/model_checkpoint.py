"""Megatron model checkpoints: reshardable weights plus everything needed to rebuild the model.

Layout of a checkpoint folder::

    DIR/
      nemo_dvpo_checkpoint.json   what this is (kind, model config, parallel layout it was saved at)
      hf/                         the Hugging Face config, generation config and tokenizer files
      weights/                    megatron-core distributed checkpoint (torch_dist)

The weights are a megatron-core *distributed* checkpoint: every tensor is stored with its global
shape and the offsets of its shards, so a checkpoint saved at TP=1 loads at TP=2, TP=3 or PP=2 and
vice versa. Saving is atomic: everything is written into a hidden sibling folder that is renamed
into place only once complete, and the metadata file is written last, so a killed save never leaves
a folder that looks like a valid checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.sources import save_tokenizer
from nemo_dvpo.utils.config import from_dict
from nemo_dvpo.utils.errors import CheckpointError

METADATA_FILE = "nemo_dvpo_checkpoint.json"
# Written into Hugging Face folders that nemo_dvpo exports (marks them as ours to replace).
EXPORT_MARKER_FILE = "nemo_dvpo_export.json"
FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_error(error: Optional[BaseException], cleanup=None) -> None:
    """Raise on every rank if rank 0 failed, so no rank waits forever in a collective.

    ``cleanup`` runs first (on every rank) when there is an error to raise.
    """
    if dist.is_initialized():
        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            error = CheckpointError(message[0])
    if error is not None:
        if cleanup is not None:
            cleanup()
        raise error


def _fsync_tree(folder: Path) -> None:
    import os

    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_json_atomic(path: Path, payload: dict) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def is_our_layout(folder: Path) -> bool:
    """Whether ``folder`` is a complete checkpoint or Hugging Face export that nemo_dvpo wrote."""
    return (Path(folder) / METADATA_FILE).is_file() or (Path(folder) / EXPORT_MARKER_FILE).is_file()


class AtomicCheckpointDir:
    """Collective context manager yielding a staging folder that replaces ``final`` on success.

    All ranks enter and exit it together; rank 0 owns folder creation and the final rename. ``final``
    is replaced only when it is one of our own complete layouts (:func:`is_our_layout`) or empty: a
    folder holding anything else is refused, so a user's files are never deleted. A failed save leaves
    no staging folder behind, and a full disk is reported with the space the save needed (see
    :meth:`reserve`).
    """

    def __init__(self, final: str | Path):
        self.final = Path(final).expanduser().resolve()
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self.needed_bytes: Optional[int] = None

    def __enter__(self) -> Path:
        error = None
        if _rank() == 0:
            try:
                if self.final.exists() and (not self.final.is_dir() or (any(self.final.iterdir())
                                                                        and not is_our_layout(self.final))):
                    what = "a file" if not self.final.is_dir() else "a folder that nemo_dvpo did not write"
                    raise CheckpointError(f"refusing to replace {self.final}: it is {what}")
                self.final.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging.mkdir()
            except OSError as exc:
                error = CheckpointError(f"cannot create checkpoint folder {self.staging}: {exc}")
            except CheckpointError as exc:
                error = exc
        _broadcast_error(error)
        return self.staging

    def reserve(self, nbytes_this_rank: int) -> None:
        """Collective: refuse the save up front when the disk cannot hold what all ranks will write."""
        from nemo_dvpo.checkpointing.distributed_io import free_bytes, mib

        total = torch.tensor([float(nbytes_this_rank)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            from nemo_dvpo.utils.distributed import all_reduce_on_device

            total = all_reduce_on_device(total)
        self.needed_bytes = int(total.item())
        error = None
        if _rank() == 0:
            free = free_bytes(self.staging)
            if free is not None and free < self.needed_bytes:
                error = CheckpointError(f"not enough disk space to save {self.final}: it needs about "
                                        f"{mib(self.needed_bytes)}, {mib(free)} are free; nothing was written")
        _broadcast_error(error, cleanup=self._remove_staging)

    def _remove_staging(self) -> None:
        if _rank() == 0:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            # Every rank failed in the same collective save (or the caller raised on all ranks).
            self._remove_staging()
            from nemo_dvpo.checkpointing.distributed_io import is_disk_full, mib

            if isinstance(exc, Exception) and is_disk_full(exc):
                needed = f" it needed about {mib(self.needed_bytes)};" if self.needed_bytes else ""
                raise CheckpointError(f"the disk filled up while saving {self.final}:{needed} the partial "
                                      "save was removed, the previous checkpoints are intact") from None
            return False
        _barrier()
        error = None
        if _rank() == 0:
            try:
                _fsync_tree(self.staging)
                previous = self.final.parent / f".{self.final.name}.previous"
                shutil.rmtree(previous, ignore_errors=True)
                if self.final.exists():
                    self.final.rename(previous)
                self.staging.rename(self.final)
                shutil.rmtree(previous, ignore_errors=True)
            except OSError as exc:
                shutil.rmtree(self.staging, ignore_errors=True)
                error = CheckpointError(f"cannot move checkpoint into place at {self.final}: {exc}")
        _broadcast_error(error)
        return False


def save_sharded_weights(model: list[torch.nn.Module], folder: Path) -> None:
    """Collective: write the model's sharded state dict as a megatron-core distributed checkpoint."""
    from nemo_dvpo.checkpointing.distributed_io import save_distributed
    from nemo_dvpo.models.builder import unwrap_model

    if len(model) != 1:
        raise CheckpointError("virtual pipeline stages are not supported by nemo_dvpo checkpoints")
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    save_distributed(unwrap_model(model[0]).sharded_state_dict(), folder)


def adapter_metadata(model: list[torch.nn.Module]) -> dict:
    """``{"lora": settings}`` for a model with LoRA adapters (what loading needs to rebuild them), else ``{}``."""
    from nemo_dvpo.models.lora import lora_config_of

    lora = lora_config_of(model)
    return {"lora": dataclasses.asdict(lora)} if lora is not None else {}


def _saved_lora(weights: Path) -> Optional[dict]:
    metadata_file = Path(weights).parent / METADATA_FILE
    return json.loads(metadata_file.read_text()).get("lora") if metadata_file.is_file() else None


def _check_lora_layout(model: list[torch.nn.Module], folder: Path, saved_lora: Optional[dict]) -> bool:
    """Whether the checkpoint's adapters must be merged into ``model`` while loading (it has none of its own)."""
    from nemo_dvpo.models.lora import lora_config_of

    lora = lora_config_of(model)
    if lora is None:
        return saved_lora is not None
    adapter_shape = ("dim", "alpha", "target_modules")
    if saved_lora is None or any(saved_lora.get(name) != getattr(lora, name) for name in adapter_shape):
        saved = "no LoRA adapters" if saved_lora is None else \
            "LoRA " + ", ".join(f"{name}={saved_lora.get(name)}" for name in adapter_shape)
        mine = ", ".join(f"{name}={value}" for name, value in dataclasses.asdict(lora).items() if name in adapter_shape)
        raise CheckpointError(f"checkpoint {folder.parent} holds {saved}, the model has LoRA {mine}: resume with "
                              "the lora settings it was saved with")
    return False


def _adapt_for_merge(model: list[torch.nn.Module], saved_lora: dict, folder: Path) -> dict:
    """Give ``model`` the checkpoint's adapters, to be merged after loading; returns the ``requires_grad`` flags
    to restore (LoRA freezes the base, but the caller built this model to train as it chose)."""
    from megatron.core import parallel_state

    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.models.lora import LoRAConfig, apply_lora

    groups = unwrap_model(model[0]).pg_collection
    if dist.is_initialized() and dist.get_process_group_ranks(groups.tp) != \
            dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()):
        # megatron-bridge's adapters always use the global tensor-parallel group.
        raise CheckpointError(f"{folder.parent} holds unmerged LoRA adapters, which cannot be loaded into a model "
                              "on its own process groups: use the run's final (merged) checkpoint")
    flags = {param: param.requires_grad for chunk in model for param in chunk.parameters()}
    apply_lora(model, from_dict(LoRAConfig, saved_lora, f"{folder.parent / METADATA_FILE}:lora"))
    return flags


def _without_absent_extra_state(sharded_state_dict: dict, folder: Path) -> dict:
    """``sharded_state_dict`` less the Transformer Engine ``_extra_state`` objects that ``folder`` does not hold.

    A TE-spec model asks for one ``_extra_state`` object per TE module (FP8 scaling state; empty in bf16/fp32). A
    checkpoint written under the local spec (every CPU run) holds those of the linear layers (megatron's local
    linear layers save an empty one under the same names) but not the one of TE's attention module, and
    megatron-core's torch_dist loader treats a requested key that the checkpoint lacks as an error. Megatron-Bridge's weights-only load discards
    the extra state too (``delete_extra_state``); here it is not requested at all, so the module keeps the state it
    was built with. Weights are never dropped: a missing weight still fails the load.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader

    def requested(value) -> bool:
        return not (isinstance(value, ShardedObject) and value.key.endswith("_extra_state")
                    and value.unique_key not in saved_keys)

    def prune(node):
        if isinstance(node, dict):
            return {name: prune(value) for name, value in node.items() if requested(value)}
        return node

    if not any(isinstance(value, ShardedObject) for value in _nested_values(sharded_state_dict)):
        return sharded_state_dict
    try:
        saved_keys = set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    except Exception:  # an unreadable checkpoint: load_distributed names the damage
        return sharded_state_dict
    return prune(sharded_state_dict)


def _nested_values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _nested_values(value)
    else:
        yield node


def load_sharded_weights(model: list[torch.nn.Module], folder: Path, strict: bool = True) -> None:
    """Collective: load a distributed checkpoint into ``model`` at the current TP/PP layout.

    A checkpoint with LoRA adapters (a training checkpoint of a LoRA run) loads into a model with the same
    adapters (resuming); into a model without adapters it loads merged (:func:`nemo_dvpo.models.lora.merge_adapters`).
    """
    from nemo_dvpo.checkpointing.distributed_io import load_distributed
    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.models.lora import merge_adapters

    saved_lora = _saved_lora(folder)
    merge = _check_lora_layout(model, Path(folder), saved_lora)
    flags = _adapt_for_merge(model, saved_lora, Path(folder)) if merge else None
    module = unwrap_model(model[0])
    # Replica ids come from the model's own data-parallel group: a model on its own process groups
    # (a GVM at another TP size) would otherwise be validated against the global layout's.
    metadata = {"dp_cp_group": module.pg_collection.dp_cp}
    with torch.no_grad():
        sharded_state_dict = _without_absent_extra_state(module.sharded_state_dict(metadata=metadata), Path(folder))
        state_dict = load_distributed(sharded_state_dict, Path(folder), label=str(Path(folder).parent))
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    # TE layers carry "_extra_state" entries that a local-spec checkpoint does not have.
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if merge:
        merge_adapters(model)
        for param, requires_grad in flags.items():
            param.requires_grad_(requires_grad)


def save_hf_artifacts(folder: Path, hf_config, tokenizer=None) -> None:
    """The HF config, generation config and tokenizer (chat template included) of a model."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(folder)
    try:
        GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
    except ValueError:
        pass  # a config with no generation-relevant fields
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


def save_model_checkpoint(model: list[torch.nn.Module], path: str | Path, model_cfg: ModelConfig,
                          hf_config, tokenizer=None, kind: str = "model",
                          extra: Optional[dict[str, Any]] = None) -> Path:
    """Collective: save model weights + config + tokenizer atomically to ``path``."""
    from nemo_dvpo.checkpointing.distributed_io import state_dict_nbytes
    from nemo_dvpo.models.builder import unwrap_model

    with (target := AtomicCheckpointDir(path)) as staging:
        target.reserve(state_dict_nbytes(unwrap_model(model[0]).sharded_state_dict()))
        save_sharded_weights(model, staging / "weights")
        if _rank() == 0:
            save_hf_artifacts(staging / "hf", hf_config, tokenizer)
            write_json_atomic(staging / METADATA_FILE, checkpoint_metadata(
                model_cfg, kind, tokenizer, {**(extra or {}), **adapter_metadata(model)}))
    return Path(path)


def checkpoint_metadata(model_cfg: ModelConfig, kind: str, tokenizer, extra: Optional[dict[str, Any]] = None) -> dict:
    """What ``nemo_dvpo_checkpoint.json`` records: the model config and the layout it was saved at.

    The weight and tokenizer sources are dropped: the checkpoint itself is now the source.
    """
    from megatron.core import parallel_state

    saved_cfg = dataclasses.replace(model_cfg, source=None, tokenizer=None, random_init=False)
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": dataclasses.asdict(saved_cfg),
        "saved_with": {
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        },
        "has_tokenizer": tokenizer is not None,
        **(extra or {}),
    }


def read_checkpoint_metadata(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    metadata_file = folder / METADATA_FILE
    if not metadata_file.exists():
        hint = ""
        if (folder / "config.json").exists():
            hint = (" It looks like a Hugging Face folder: convert it first with "
                    "tools/convert_hf_to_megatron.py, or use it as model.source.")
        elif (folder.parent / f".{folder.name}.partial").exists():
            hint = " A save into it did not finish."
        raise CheckpointError(f"{folder} is not a nemo_dvpo checkpoint (no {METADATA_FILE}).{hint}")
    try:
        metadata = json.loads(metadata_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{metadata_file}: not valid JSON ({error})") from error
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{metadata_file}: format_version {metadata.get('format_version')!r} "
                              f"is not supported (expected {FORMAT_VERSION})")
    return metadata


def read_checkpoint_model_config(path: str | Path, run_as: Optional[ModelConfig] = None) -> ModelConfig:
    """The model config stored in a checkpoint; the tokenizer points into the checkpoint.

    ``run_as``: the caller's config, whose run settings (``ModelConfig.RUN_SETTINGS``: precision, activation
    recompute) replace the checkpoint's - the checkpoint says what the model is, the caller how to run it.
    """
    metadata = read_checkpoint_metadata(path)
    model_cfg = from_dict(ModelConfig, metadata["model"], f"{Path(path) / METADATA_FILE}:model")
    tokenizer = str(Path(path).resolve() / "hf") if metadata.get("has_tokenizer") else None
    settings = {name: getattr(run_as, name) for name in ModelConfig.RUN_SETTINGS} if run_as is not None else {}
    return dataclasses.replace(model_cfg, tokenizer=tokenizer, **settings)


def load_hf_config_from_checkpoint(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(Path(path) / "hf")


def load_model_checkpoint(path: str | Path, precision: Optional[str] = None, **build_kwargs: Any):
    """Collective: rebuild the model stored at ``path`` at the current TP/PP layout and load it.

    Returns ``(model, model_cfg, tokenizer)``; ``tokenizer`` is None if none was saved.
    Call after :func:`nemo_dvpo.utils.distributed.initialize_distributed`.
    """
    from nemo_dvpo.models.builder import build_gpt_model
    from nemo_dvpo.models.sources import load_tokenizer

    model_cfg = read_checkpoint_model_config(path)
    if precision is not None:
        model_cfg = dataclasses.replace(model_cfg, precision=precision)
    hf_config = load_hf_config_from_checkpoint(path)
    model = build_gpt_model(model_cfg, hf_config=hf_config, load_weights=False, **build_kwargs)
    load_sharded_weights(model, Path(path) / "weights")
    tokenizer = load_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
    return model, model_cfg, tokenizer


def load_value_model(model_cfg: ModelConfig, init_from: Optional[str] = None, **build_kwargs: Any):
    """Collective: :func:`nemo_dvpo.models.value_model.build_value_model`, its weights from ``init_from``.

    None builds from ``model_cfg.source`` with a fresh (zero) head; a nemo_dvpo model checkpoint folder loads
    that model's trunk, a value-model checkpoint (any of ``VALUE_MODEL_KINDS``: a GVM, a reward model, PPO's
    critic) trunk and head. With a checkpoint, only ``model_cfg.precision`` and ``model_cfg.activation_recompute``
    are taken from ``model_cfg``; the shape is the checkpoint's. ``build_kwargs`` go to ``build_value_model``.
    """
    from nemo_dvpo.models.value_model import VALUE_MODEL_KINDS, build_value_model

    if init_from is None:
        return build_value_model(model_cfg, **build_kwargs)
    kind = read_checkpoint_metadata(init_from)["kind"]
    weights = Path(init_from) / "weights"
    # The checkpoint defines the shape; the caller chooses how it runs.
    return build_value_model(read_checkpoint_model_config(init_from, run_as=model_cfg),
                             hf_config=load_hf_config_from_checkpoint(init_from),
                             load_weights=lambda model: load_sharded_weights(model, weights),
                             restores_head=kind in VALUE_MODEL_KINDS, **build_kwargs)
