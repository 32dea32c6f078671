"""Training checkpoints: a model checkpoint plus everything needed to continue the run exactly.

Layout (``RUN_DIR/checkpoints/step_0000100/``)::

    nemo_dvpo_checkpoint.json   model checkpoint metadata (see model_checkpoint.py)
    hf/                         HF config + tokenizer
    weights/                    model weights (distributed checkpoint)
    optimizer/                  optimizer state (distributed checkpoint, data-parallel reshardable)
    trainer_state.json          step, data position, LR schedule, algorithm state (KL controller, ...)
    rng/rank_00000.pt           per-rank torch / CUDA RNG states

Because ``weights/`` and the metadata are those of a model checkpoint, every training checkpoint is
also a model checkpoint (``load_model_checkpoint``, ``build_value_model(init_from=...)``, the
conversion tools). ``RUN_DIR/checkpoints/latest`` names the newest complete checkpoint; it is
rewritten atomically after the checkpoint folder is in place, so a run killed at any moment
resumes from a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_dvpo.checkpointing.model_checkpoint import (
    METADATA_FILE,
    AtomicCheckpointDir,
    _barrier,
    _rank,
    checkpoint_metadata,
    load_sharded_weights,
    save_hf_artifacts,
    write_json_atomic,
)
from nemo_dvpo.utils.errors import CheckpointError

TRAINER_STATE_FILE = "trainer_state.json"
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(run_dir: str | Path, step: int, model: list[torch.nn.Module], optimizer, scheduler,
                             model_cfg, hf_config, tokenizer, kind: str, trainer_state: dict[str, Any],
                             metadata: Optional[dict[str, Any]] = None, keep_last: int = 2) -> Path:
    """Collective: write the checkpoint for ``step`` atomically and point ``latest`` at it."""
    from megatron.core import dist_checkpointing

    from nemo_dvpo.models.builder import unwrap_model

    path = checkpoint_dir(run_dir, step)
    module = unwrap_model(model[0])
    with AtomicCheckpointDir(path) as staging:
        if _rank() == 0:
            (staging / "weights").mkdir()
            (staging / "optimizer").mkdir()
            (staging / "rng").mkdir()
        _barrier()
        model_state = module.sharded_state_dict()
        dist_checkpointing.save(model_state, str(staging / "weights"))
        optimizer_state = optimizer.sharded_state_dict(module.sharded_state_dict(), metadata=_OPTIMIZER_METADATA)
        dist_checkpointing.save(optimizer_state, str(staging / "optimizer"))
        torch.save(_rng_state(), staging / "rng" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            save_hf_artifacts(staging / "hf", hf_config, tokenizer)
            write_json_atomic(staging / TRAINER_STATE_FILE, {
                "step": step, "scheduler": scheduler.state_dict(), **trainer_state})
            write_json_atomic(staging / METADATA_FILE, checkpoint_metadata(
                model_cfg, kind, tokenizer, {"step": step, **(metadata or {})}))
    if _rank() == 0:
        _point_latest_at(run_dir, path)
        _remove_old_checkpoints(run_dir, keep_last)
    _barrier()
    return path


def _point_latest_at(run_dir: str | Path, path: Path) -> None:
    latest = Path(run_dir) / "checkpoints" / "latest"
    tmp = latest.with_name(".latest.tmp")
    tmp.write_text(path.name + "\n")
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    tmp.replace(latest)


def _remove_old_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    folders = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())
    for old in folders[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None if it has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.exists():
        return None
    path = latest.parent / latest.read_text().strip()
    if not (path / TRAINER_STATE_FILE).exists():
        raise CheckpointError(f"{latest} names {path.name}, which is missing or incomplete")
    return path


def _prime_adam_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state, which loading then overwrites.

    megatron-core's DistributedOptimizer (without apex/TE) reads Adam's ``step`` from the torch
    optimizer's per-parameter state when building the state dict to load into; a never-stepped
    optimizer has none and fails an assertion.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)


def _restore_adam_step(optimizer) -> None:
    """Copy Adam's step count from the loaded param groups into the per-parameter state.

    Without apex/TE, megatron-core's DistributedOptimizer checkpoints the step as a param-group
    entry, but torch's Adam reads it from each parameter's state; left at zero, the bias
    correction of every later update would be wrong.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if "step" in torch_optimizer.state[param]:
                    torch_optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


def load_training_checkpoint(path: str | Path, model: list[torch.nn.Module], optimizer, scheduler) -> dict:
    """Collective: restore model, optimizer, schedule and RNG; return the trainer state dict."""
    from megatron.core import dist_checkpointing

    from nemo_dvpo.models.builder import unwrap_model

    path = Path(path)
    for required in ("weights", "optimizer", TRAINER_STATE_FILE):
        if not (path / required).exists():
            raise CheckpointError(f"training checkpoint {path} is incomplete: {required} is missing")
    load_sharded_weights(model, path / "weights")
    module = unwrap_model(model[0])
    with torch.no_grad():
        _prime_adam_state(optimizer)
        optimizer_state = optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True,
                                                       metadata=_OPTIMIZER_METADATA)
        optimizer.load_state_dict(dist_checkpointing.load(optimizer_state, str(path / "optimizer")))
        _restore_adam_step(optimizer)
    trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    # A run resumed on more ranks than it was saved from has no stream for the new ranks: its data
    # order is still exact (a function of the step); only their sampling streams start from seeds.
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
