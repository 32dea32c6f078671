"""Training checkpoints: a model checkpoint plus everything needed to continue the run exactly.

Layout (``RUN_DIR/checkpoints/step_0000100/``)::

    nemo_dvpo_checkpoint.json   model checkpoint metadata (see model_checkpoint.py)
    hf/                         HF config + tokenizer
    weights/                    model weights (distributed checkpoint)
    optimizer/                  optimizer state (distributed checkpoint, data-parallel reshardable)
    trainer_state.json          step, data position, LR schedule, algorithm state (KL controller, ...)
    rng/rank_00000.pt           per-rank torch / CUDA RNG states

Because ``weights/`` and the metadata are those of a model checkpoint, every training checkpoint is
also a model checkpoint (``load_model_checkpoint``, ``load_value_model(init_from=...)``, the
conversion tools). ``RUN_DIR/checkpoints/latest`` names the newest complete checkpoint; it is
rewritten atomically after the checkpoint folder is in place, so a run killed at any moment
resumes from a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from nemo_dvpo.checkpointing.model_checkpoint import (
    METADATA_FILE,
    AtomicCheckpointDir,
    _barrier,
    _rank,
    adapter_metadata,
    checkpoint_metadata,
    load_sharded_weights,
    save_hf_artifacts,
    write_json_atomic,
)
from nemo_dvpo.utils.errors import CheckpointError

TRAINER_STATE_FILE = "trainer_state.json"


class TrainedModel(NamedTuple):
    """A further model a run trains beside its main one (PPO's critic), checkpointed in a subfolder of the
    step's checkpoint (``<name>/``, itself a model checkpoint) and resumed with it."""

    model: list
    optimizer: Any
    scheduler: Any
    model_cfg: Any
    hf_config: Any
    kind: str
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


def _model_and_optimizer_states(model: list[torch.nn.Module], optimizer) -> tuple[dict, dict]:
    from nemo_dvpo.models.builder import unwrap_model

    module = unwrap_model(model[0])
    # A model that has not stepped yet (PPO's policy during the critic's warm-up) has no Adam state; save
    # the zero state a fresh Adam starts from, so the checkpoint has every key that loading asks for.
    with torch.no_grad():
        _prime_adam_state(optimizer)
    return (module.sharded_state_dict(),
            optimizer.sharded_state_dict(module.sharded_state_dict(), metadata=_OPTIMIZER_METADATA))


def save_training_checkpoint(run_dir: str | Path, step: int, model: list[torch.nn.Module], optimizer, scheduler,
                             model_cfg, hf_config, tokenizer, kind: str, trainer_state: dict[str, Any],
                             metadata: Optional[dict[str, Any]] = None, keep_last: int = 2,
                             extra_models: Optional[dict[str, TrainedModel]] = None) -> Path:
    """Collective: write the checkpoint for ``step`` atomically and point ``latest`` at it.

    ``extra_models`` are saved in subfolders of the same checkpoint, so the models of one step are
    complete together or not at all.
    """
    from nemo_dvpo.checkpointing.distributed_io import save_distributed, state_dict_nbytes

    path = checkpoint_dir(run_dir, step)
    extra_models = extra_models or {}
    with (target := AtomicCheckpointDir(path)) as staging:
        parts = {".": (_model_and_optimizer_states(model, optimizer), model_cfg, hf_config, kind,
                       adapter_metadata(model))}
        for name, trained in extra_models.items():
            parts[name] = (_model_and_optimizer_states(trained.model, trained.optimizer), trained.model_cfg,
                           trained.hf_config, trained.kind, adapter_metadata(trained.model))
        target.reserve(sum(state_dict_nbytes(model_state) + state_dict_nbytes(optimizer_state)
                           for (model_state, optimizer_state), *_ in parts.values()))
        if _rank() == 0:
            for name in parts:
                (staging / name / "weights").mkdir(parents=True)
                (staging / name / "optimizer").mkdir()
            (staging / "rng").mkdir()
        _barrier()
        for name, ((model_state, optimizer_state), *_) in parts.items():
            save_distributed(model_state, staging / name / "weights")
            save_distributed(optimizer_state, staging / name / "optimizer")
        torch.save(_rng_state(), staging / "rng" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            for name, (_, part_cfg, part_hf_config, part_kind, part_adapters) in parts.items():
                save_hf_artifacts(staging / name / "hf", part_hf_config, tokenizer)
                write_json_atomic(staging / name / METADATA_FILE, checkpoint_metadata(
                    part_cfg, part_kind, tokenizer,
                    {"step": step, **((metadata or {}) if name == "." else {}), **part_adapters}))
            write_json_atomic(staging / TRAINER_STATE_FILE, {
                "step": step, "scheduler": scheduler.state_dict(), "extra_models": sorted(extra_models),
                "extra_schedulers": {name: trained.scheduler.state_dict() for name, trained in extra_models.items()},
                **trainer_state})
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
    """The newest checkpoint of a run (what ``checkpoints/latest`` names), or None if it has none."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    path = latest.parent / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{latest} names {name!r}, which is missing{_earlier_hint(run_dir, None)}")
    return path


def verify_training_checkpoint(path: str | Path) -> dict:
    """Check a training checkpoint's files before loading; return its trainer state.

    Every damaged part is named: a missing or truncated weight or optimizer shard, a missing
    ``.metadata``, a ``trainer_state.json`` or RNG file that is missing or cut short.
    """
    from nemo_dvpo.checkpointing.distributed_io import verify_distributed_checkpoint

    path = Path(path)
    label = str(path)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{label}: {METADATA_FILE} is missing (an unfinished save?)")
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{label}: {TRAINER_STATE_FILE} is missing")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{label}: {TRAINER_STATE_FILE} is truncated or damaged ({error})") from None
    if not isinstance(state, dict) or "step" not in state or "scheduler" not in state:
        raise CheckpointError(f"{label}: {TRAINER_STATE_FILE} lacks the step or the schedule state")
    for name in [".", *state.get("extra_models", [])]:
        verify_distributed_checkpoint(path / name / "weights", label)
        verify_distributed_checkpoint(path / name / "optimizer", label)
    return state


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints that pass :func:`verify_training_checkpoint`, oldest first."""
    complete = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        try:
            verify_training_checkpoint(folder)
        except CheckpointError:
            continue
        complete.append(folder)
    return complete


def _earlier_hint(run_dir: str | Path, damaged: Optional[Path]) -> str:
    earlier = [path for path in complete_checkpoints(run_dir) if damaged is None or path.name < damaged.name]
    if earlier:
        return (f". Complete earlier checkpoints: {', '.join(path.name for path in earlier)}; resume from one "
                f"with resume_from={earlier[-1]}")
    return ". No complete earlier checkpoint: start over with overwrite=true"


def checkpoint_to_resume(run_dir: str | Path, resume: bool, resume_from: Optional[str]) -> Optional[Path]:
    """The checkpoint a run continues from: ``resume_from``, else with ``resume`` the run's latest.

    It is verified first; a damaged one is refused with the earlier complete checkpoints listed.
    """
    if resume_from:
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"resume_from={resume_from} does not exist")
    elif resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            return None
    else:
        return None
    try:
        verify_training_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume: {error}{_earlier_hint(path.parent.parent, path)}") from None
    return path


def _prime_adam_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state, which loading then overwrites.

    megatron-core's DistributedOptimizer (without apex/TE) reads Adam's ``step`` from the torch
    optimizer's per-parameter state when building the state dict to load into; a never-stepped
    optimizer has none and fails an assertion.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            # With CUDA the Adam is Transformer Engine's (or apex's) FusedAdam, which keeps its step in the param
            # groups; megatron-core's own initializer gives its empty per-parameter state the zero moments, as
            # megatron does itself before loading into a fresh optimizer.
            init_state_fn = getattr(inner, "init_state_fn", None)
            if callable(init_state_fn) and any(not torch_optimizer.state[param] for group in torch_optimizer.param_groups
                                               for param in group["params"]):
                init_state_fn(torch_optimizer, getattr(inner, "config", None))
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


def _restore_zero_common_step(optimizer_state) -> None:
    """Put back the Adam step of an optimizer saved before its first step.

    megatron-core's FP32Optimizer saves the step once for all parameters as ``common_step``, but only
    when it is non-zero; loading the primed zero state without it would leave Adam's state without a step.
    """
    if isinstance(optimizer_state, dict) and "state" not in optimizer_state:
        optimizer_state = list(optimizer_state.values())  # a ChainedOptimizer's, keyed by optimizer index
    for state_dict in optimizer_state if isinstance(optimizer_state, list) else [optimizer_state]:
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if isinstance(state, dict) and state and "common_step" not in state and \
                all(isinstance(value, dict) and "step" not in value for value in state.values()):
            state["common_step"] = torch.tensor(0.0)


def _load_model_and_optimizer(path: Path, model: list[torch.nn.Module], optimizer) -> None:
    from nemo_dvpo.checkpointing.distributed_io import load_distributed
    from nemo_dvpo.models.builder import unwrap_model

    load_sharded_weights(model, path / "weights")
    module = unwrap_model(model[0])
    with torch.no_grad():
        _prime_adam_state(optimizer)
        optimizer_state = optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True,
                                                       metadata=_OPTIMIZER_METADATA)
        loaded = load_distributed(optimizer_state, path / "optimizer", label=str(path))
        _restore_zero_common_step(loaded)
        optimizer.load_state_dict(loaded)
        _restore_adam_step(optimizer)


def load_training_checkpoint(path: str | Path, model: list[torch.nn.Module], optimizer, scheduler,
                             extra_models: Optional[dict[str, TrainedModel]] = None) -> dict:
    """Collective: restore model, optimizer, schedule (and those of ``extra_models``) and RNG; return the
    trainer state dict."""
    path = Path(path)
    trainer_state = verify_training_checkpoint(path)
    extra_models = extra_models or {}
    saved_extras = trainer_state.pop("extra_models", [])
    if sorted(extra_models) != sorted(saved_extras):
        raise CheckpointError(f"{path} holds the models {['policy', *saved_extras]}, this run trains "
                              f"{['policy', *sorted(extra_models)]}: resume with the settings it was saved with")
    _load_model_and_optimizer(path, model, optimizer)
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    extra_schedulers = trainer_state.pop("extra_schedulers", {})
    for name, trained in extra_models.items():
        _load_model_and_optimizer(path / name, trained.model, trained.optimizer)
        trained.scheduler.load_state_dict(extra_schedulers[name])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    # A run resumed on more ranks than it was saved from has no stream for the new ranks: its data
    # order is still exact (a function of the step); only their sampling streams start from seeds.
    if rng_file.exists():
        try:
            rng_state = torch.load(rng_file, weights_only=False)
        except Exception as error:  # a truncated file raises EOFError, RuntimeError, UnpicklingError, ...
            raise CheckpointError(f"{path}: rng/{rng_file.name} is truncated or damaged ({error})") from None
        _set_rng_state(rng_state)
    return trainer_state
