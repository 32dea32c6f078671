"""The lifecycle every recipe shares - GVM, reward model, DPO, DVPO, PPO, GRPO: a :class:`Run`.

A recipe builds its models between the run's set-up and its resume, then writes ``train()`` as its algorithm::

    run = Run(cfg, "dvpo", stop)               # distributed init, run folder, model config, tokenizer
    ... the recipe's models, data, scorers ...
    run.track(TrainedModel(...), state=...)    # what a checkpoint holds
    saved = run.resume()                       # restores the tracked models; the recipe's own saved state
    with run.stopping():
        for step in run.steps(show=(...)):     # progress bar; after each step a checkpoint and the stop check
            ... the numbered algorithm ...
            run.log(step, metrics)
        final, hf_dir = run.save_final(model, extra={...}, export_hf=True)
        summary = run.write_summary({...})

Every recipe's config holds the fields read here: ``model``, ``parallel``, ``run_dir``, ``resume``,
``resume_from``, ``overwrite``, ``init_from`` and ``train.steps`` / ``train.save_every`` / ``train.keep_last``.
Metric names are the same in every recipe: ``time/step_s`` and ``time/<phase>_s`` (:class:`PhaseTimer`),
``perf/peak_memory_mib``, ``perf/*_tokens_per_s``, ``train/*`` (the update), ``rollout/*`` and ``eval/*``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from nemo_dvpo.checkpointing.conversion import export_model_to_hf
from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config, save_model_checkpoint
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import TrainedModel, load_training_checkpoint, save_training_checkpoint
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.sources import load_tokenizer, special_token_ids
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.metrics import MetricsLogger, PhaseTimer, peak_memory_mib, progress_bar
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils import cpu_runtime
from nemo_dvpo.utils.distributed import initialize_distributed, is_rank_zero, print_rank_zero
from nemo_dvpo.utils.errors import ConfigError, TrainingStopped


def model_config(preset: ModelConfig, init_from: Optional[str]) -> ModelConfig:
    """The trained model's config: the preset's, or - starting from a checkpoint - the checkpoint's shape run the way
    the preset says (precision, activation recompute: ``ModelConfig.RUN_SETTINGS``)."""
    return preset if init_from is None else read_checkpoint_model_config(init_from, run_as=preset)


def check_global_batch(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> None:
    """A supervised step's global batch splits into data-parallel ranks x micro-batches (GVM, reward model, DPO)."""
    per_rank, remainder = divmod(global_batch_size, data_parallel_size)
    if remainder or per_rank % micro_batch_size:
        raise ConfigError(f"train.global_batch_size={global_batch_size} must split into data-parallel size "
                          f"{data_parallel_size} x micro-batches of train.micro_batch_size={micro_batch_size}")


class Run:
    """A training run's life: set-up, resume, the step loop with checkpoints and stops, the final save, the summary.

    ``tag`` names the recipe in messages and the progress bar (``[dvpo]``). Building a run initialises distributed
    state, checks the run folder (and the checkpoint to resume, against the model), and loads the tokenizer with
    the one EOS / padding rule (:func:`~nemo_dvpo.models.sources.special_token_ids`).
    """

    def __init__(self, cfg, tag: str, stop: Optional[GracefulStop] = None):
        self.cfg, self.tag = cfg, tag
        self.stop = stop or GracefulStop()
        preset = cfg.model
        initialize_distributed(cfg.parallel, num_attention_heads=preset.num_attention_heads,
                               num_query_groups=preset.num_query_groups, num_layers=preset.num_layers)
        self.checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                          resume_from=cfg.resume_from)
        self.run_dir = Path(cfg.run_dir)
        self.data_parallel = DataParallel.from_parallel_state()
        self.model_cfg = model_config(preset, cfg.init_from)
        if self.checkpoint is not None:
            check_resumed_model(self.checkpoint, self.model_cfg)
        self.tokenizer = load_tokenizer(self.model_cfg.tokenizer_source)
        self.eos_token_id, self.pad_token_id = special_token_ids(self.tokenizer, self.model_cfg)
        self.total_steps = cfg.train.steps
        # The step the loop starts at (after a resume, the checkpoint's) and the step the final model is from
        # (earlier than total_steps when the recipe ends the run early: :meth:`end_after_this_step`).
        self.start_step = 0
        self.final_step = self.total_steps
        self.step_times: list[float] = []
        self.last_metrics: dict[str, float] = {}
        self.logger: Optional[MetricsLogger] = None
        self._tracked: Optional[TrainedModel] = None
        self._extra_models: dict[str, TrainedModel] = {}
        self._state: Callable[[], dict] = dict
        self._metadata: Optional[dict] = None
        self._ending = False

    # -- set-up --------------------------------------------------------------------------------------------

    def track(self, trained: TrainedModel, state: Callable[[], dict] = dict, metadata: Optional[dict] = None,
              extra_models: Optional[dict[str, TrainedModel]] = None) -> None:
        """What a checkpoint holds: the trained model (with optimizer and schedule), ``state()`` - the recipe's
        own resumable state (a KL controller, the score before training) - ``metadata`` for the checkpoint's
        description, and further trained models (PPO's critic) saved and resumed with it."""
        self._tracked, self._state, self._metadata = trained, state, metadata
        self._extra_models = dict(extra_models or {})

    def resume(self) -> dict:
        """Restore the tracked models from the checkpoint, if resuming, and open the metrics log; returns the
        recipe's saved state (empty on a fresh start)."""
        saved: dict = {}
        if self.cfg.resume and self.checkpoint is None:
            print_rank_zero(f"[{self.tag}] resume=true but {self.run_dir} has no checkpoint yet: starting fresh")
        if self.checkpoint is not None:
            trained = self._tracked
            saved = load_training_checkpoint(self.checkpoint, trained.model, trained.optimizer, trained.scheduler,
                                             extra_models=self._extra_models)
            self.start_step = saved.pop("step")
            print_rank_zero(f"[{self.tag}] resumed from {self.checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(self.run_dir, resume_step=self.start_step if self.checkpoint else None)
        return saved

    # -- the loop ------------------------------------------------------------------------------------------

    @contextmanager
    def stopping(self) -> Iterator[None]:
        """Signals stop the run after a step (with a checkpoint) while this is active."""
        with self.stop:
            yield

    def steps(self, show: tuple[str, ...] = ()) -> Iterator[int]:
        """The steps still to run. After each: its time, the progress bar (with the newest value of each metric
        named in ``show``), then - unless the recipe ended the run - a periodic checkpoint and the stop check."""
        shown: dict[str, str] = {}
        with progress_bar(self.total_steps, initial=self.start_step, description=self.tag) as bar:
            for step in range(self.start_step, self.total_steps):
                started = time.perf_counter()
                yield step
                self.step_times.append(time.perf_counter() - started)
                shown |= {name.split("/")[-1]: f"{self.last_metrics[name]:.3g}" for name in show
                          if name in self.last_metrics}
                bar.update(1)
                bar.set_postfix(shown)
                if self._ending:
                    break
                self._checkpoint_and_maybe_stop(step + 1)

    def phase_timer(self) -> PhaseTimer:
        return PhaseTimer()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The metrics of ``step`` (0-based), logged as step ``step + 1``: the number of updates behind them."""
        self.last_metrics = metrics
        self.logger.log(step + 1, metrics)

    def end_after_this_step(self, final_step: int) -> None:
        """End the loop after the current step, without its checkpoint; the final model is the one after
        ``final_step`` steps (the recipe has put it back, e.g. the newest policy within a KL budget)."""
        self._ending, self.final_step = True, final_step

    def _checkpoint_and_maybe_stop(self, completed: int) -> None:
        total = self.total_steps
        checkpoint = self.save(completed) if completed % self.cfg.train.save_every == 0 and completed < total \
            else None
        # Every rank asks at the same point, so one rank's signal stops all of them after this step.
        if completed < total and self.stop.should_stop():
            raise TrainingStopped(stopped_message(self.tag, self.stop.signal_name, completed, total,
                                                  checkpoint or self.save(completed)))

    def stopped(self, completed: int, checkpoint: Optional[Path]) -> TrainingStopped:
        """The error that ends a run stopped by a signal outside the loop (during an evaluation)."""
        return TrainingStopped(stopped_message(self.tag, self.stop.signal_name, completed, self.total_steps,
                                               checkpoint))

    # -- saving --------------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Collective: an atomic checkpoint of the tracked models and state after ``step`` steps."""
        trained = self._tracked
        return save_training_checkpoint(self.run_dir, step, trained.model, trained.optimizer, trained.scheduler,
                                        trained.model_cfg, trained.hf_config, self.tokenizer, kind=trained.kind,
                                        trainer_state=self._state(), metadata=self._metadata,
                                        keep_last=self.cfg.train.keep_last, extra_models=self._extra_models)

    def save_final(self, model: list, extra: Optional[dict] = None,
                   export_hf: bool = False) -> tuple[Path, Optional[Path]]:
        """Collective: ``run_dir/final`` (``model``, a plain one - adapters merged - with ``extra`` in its
        metadata), each further trained model in ``final_<name>``, and optionally the Hugging Face export
        (``run_dir/hf``). Returns ``(final, hf_dir)``."""
        trained = self._tracked
        final = self.run_dir / "final"
        save_model_checkpoint(model, final, trained.model_cfg, trained.hf_config, self.tokenizer, kind=trained.kind,
                              extra={**(extra or {}), "step": self.final_step})
        for name, other in self._extra_models.items():
            save_model_checkpoint(other.model, self.run_dir / f"final_{name}", other.model_cfg, other.hf_config,
                                  self.tokenizer, kind=other.kind, extra={"step": self.total_steps})
        hf_dir = export_model_to_hf(model, trained.hf_config, self.tokenizer, self.run_dir / "hf",
                                    exported_from=str(final)) if export_hf else None
        return final, hf_dir

    def write_summary(self, fields: dict) -> dict:
        """``summary.json`` (rank 0 writes it; every rank returns it): the recipe's ``fields``, then the steps this
        process ran, their median time, the peak memory of this stage and the CPU allocator and OpenMP runtime it
        ran with."""
        times = sorted(self.step_times)
        summary = {**fields, "steps_this_run": len(times),
                   "median_step_s": times[len(times) // 2] if times else None,
                   "peak_memory_mib": peak_memory_mib(), "cpu_allocator": cpu_runtime.allocator_in_use(),
                   "cpu_openmp": cpu_runtime.openmp_in_use()}
        if is_rank_zero():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
