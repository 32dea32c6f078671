"""A training run's folder: what a run writes there, and the rules for starting, resuming or replacing it.

``RUN_DIR/checkpoints/``, ``final/`` (and ``final_<model>/`` of further trained models), ``hf/``,
``metrics.jsonl``, ``tensorboard/`` and ``summary.json`` are the run's own. A fresh run into a folder that
already holds a run is refused - ``resume=true`` continues it, ``overwrite=true`` starts over, removing those
entries and nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from nemo_dvpo.checkpointing.train_checkpoint import checkpoint_to_resume
from nemo_dvpo.utils.errors import ConfigError
from nemo_dvpo.utils.paths import check_output_dir

RUN_ENTRIES = ("checkpoints", "final", "hf", "metrics.jsonl", "tensorboard", "summary.json")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_resumed_model(checkpoint: Path, model_cfg) -> None:
    """Refuse to resume a checkpoint saved for another model shape, naming the field that differs."""
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config

    saved = read_checkpoint_model_config(checkpoint)
    differences = [f"model.{name} is {getattr(saved, name)} in the checkpoint but {getattr(model_cfg, name)} in "
                   "this config" for name in saved.differing_shape_fields(model_cfg)]
    if differences:
        raise ConfigError(f"cannot resume from {checkpoint}: {'; '.join(differences)}. Resume with the model "
                          "settings the run started with, or start a new run_dir")


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, resume_from: Optional[str],
                    extra_entries: tuple[str, ...] = ()) -> Optional[Path]:
    """Collective: check ``run_dir`` before any work; return the checkpoint to resume from, or None.

    ``extra_entries`` are further entries of the run that ``overwrite`` removes (e.g. the stage-1 GVM
    folder of the main job).
    """
    run_dir = check_output_dir(run_dir, "run_dir")
    if overwrite and (resume or resume_from):
        raise ConfigError("overwrite=true starts the run over; it cannot be combined with resume=true or resume_from")
    checkpoint = checkpoint_to_resume(run_dir, resume, resume_from)
    # final_<name>: further models of the run (PPO's critic).
    entries = [*RUN_ENTRIES, *sorted(path.name for path in run_dir.glob("final_*"))] if run_dir.is_dir() else []
    existing = [name for name in entries if (run_dir / name).exists()]
    if checkpoint is None and existing and not (resume or overwrite):
        raise ConfigError(f"run_dir={run_dir} already holds a run ({', '.join(existing)}); resume=true continues it, "
                          "overwrite=true starts it over (removing only that run's own files)")
    if overwrite:
        if _rank() == 0:
            for name in (*entries, *extra_entries):
                entry = run_dir / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.exists():
                    entry.unlink()
        if dist.is_initialized():
            dist.barrier()
    return checkpoint
