"""What every on-policy RL recipe holds besides its algorithm: a :class:`PolicyRun`.

The policy (Megatron DDP, optimizer, schedule) and its frozen reference, the tokenizer, the step's prompts
and sampling seeds, the held-out verifiable evaluation before and after, the KL controller, checkpoints
(with any further trained models of the algorithm, e.g. PPO's critic) and exact resume, a stop on
SIGTERM/SIGINT/SIGUSR1 after a step, the metrics log, the final save, the Hugging Face export and the
summary. A recipe builds one, then writes its ``train()`` as the numbered algorithm::

    for step in run.steps():                       # progress bar; checkpoint / stop after each step
        prompt_ids, records = run.step_prompts(step)
        sample = run.sample(step, prompt_ids)        # 2. rollout
        ...                                          # the algorithm's own steps
        run.log(step, metrics)
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from nemo_dvpo.algorithms.ppo import AdaptiveKLController, FixedKLController, kl_estimate, policy_loss
from nemo_dvpo.checkpointing.model_checkpoint import (
    load_hf_config_from_checkpoint,
    load_sharded_weights,
    read_checkpoint_model_config,
    save_model_checkpoint,
)
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import (
    TrainedModel,
    load_training_checkpoint,
    save_training_checkpoint,
)
from nemo_dvpo.data.prompts import PromptSet, load_prompts
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.evaluation.value_accuracy import wilson_interval
from nemo_dvpo.evaluation.verifiable import EvaluationInterrupted, evaluate_verifiable, paired_change
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config, unwrap_model
from nemo_dvpo.checkpointing.conversion import export_model_to_hf
from nemo_dvpo.models.lora import LoRAConfig, adapters_disabled, has_adapters, merge_adapters
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.rlhf.config import EvalConfig, PolicyRunConfig, PolicyUpdateConfig
from nemo_dvpo.rlhf.rollout import Sample, sample_rollout, token_logprobs
from nemo_dvpo.rlhf.scorers import LocalValueModel, ScorerInfo, ScorerUnavailable, check_scorer_matches_policy
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.rlhf.update import LogprobOutputs, MiniBatchSchedule, minibatch_update
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.metrics import MetricsLogger, PhaseTimer, peak_memory_mib, progress_bar
from nemo_dvpo.training.offload import move_parameters, offload_enabled, offloaded
from nemo_dvpo.training.optim import build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils.distributed import initialize_distributed, is_rank_zero, print_rank_zero
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError, TrainingStopped
from nemo_dvpo.utils.seeding import derive_seed


def freeze(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    for module in model:
        module.eval()
        module.requires_grad_(False)
    return model


def build_policy_and_reference(policy_cfg, init_from: Optional[str], optim, seq_length: int,
                               offload_reference: bool = False, lora: Optional[LoRAConfig] = None):
    """``(policy, reference, hf_config)``: the policy wrapped for training (Megatron DDP) from ``init_from`` (a
    nemo_dvpo checkpoint) or the preset's source, and the reference, a frozen copy of its starting weights
    (copied in memory, not loaded twice). With an enabled ``lora`` the policy trains adapters only and the
    reference is None: it is the policy with its adapters off (:func:`reference_model`)."""
    if init_from is None:
        hf_config = resolve_hf_config(policy_cfg)
        build_kwargs = {}
    else:
        hf_config = load_hf_config_from_checkpoint(init_from)
        weights = Path(init_from) / "weights"
        build_kwargs = {"hf_config": hf_config, "load_weights": False,
                        "transform": lambda model: (load_sharded_weights(model, weights), model)[1]}
    policy = build_gpt_model(policy_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(optim), seq_length=seq_length,
                             lora=lora, **build_kwargs)
    if lora is not None and lora.enabled:
        return policy, None, hf_config
    reference = freeze(build_gpt_model(policy_cfg, hf_config=hf_config, load_weights=False, seq_length=seq_length))
    unwrap_model(reference[0]).load_state_dict(unwrap_model(policy[0]).state_dict())
    if offload_enabled(offload_reference):
        move_parameters(reference, "cpu")
    return policy, reference, hf_config


@contextmanager
def reference_model(reference: Optional[list[torch.nn.Module]], policy: list[torch.nn.Module]):
    """The model that computes the reference's log-probs: its own frozen copy, or - when the policy trains LoRA
    adapters (no copy) - the policy with its adapters off, inside the block."""
    if reference is not None:
        yield reference
        return
    with adapters_disabled(policy):
        yield policy


def finalize_policy(policy: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The policy as final checkpoints and exports hold it: LoRA adapters merged into the weights (collective
    over tensor-parallel ranks), so evaluation, serving, ``init_from`` and the HF export read a plain model."""
    return merge_adapters(policy) if has_adapters(policy) else policy


def check_update_layout(update: PolicyUpdateConfig, sequences: int, data_parallel_size: int) -> None:
    """Mini-batches must divide a step's sequences and split into data-parallel ranks x micro-batches."""
    dp = data_parallel_size
    if sequences % update.mini_batch_size or update.mini_batch_size % dp or \
            (update.mini_batch_size // dp) % update.micro_batch_size:
        raise ConfigError(
            f"ppo.mini_batch_size={update.mini_batch_size} must divide the {sequences} sequences of a step "
            f"(rollout.prompts_per_step x rollout.samples_per_prompt) and split into data-parallel size "
            f"{dp} x micro-batches of ppo.micro_batch_size={update.micro_batch_size}")


class PolicyRun:
    """The policy side of an on-policy RL run (see the module docstring).

    ``tag`` prefixes messages (``[dvpo]``). Building it initialises distributed state, checks the run folder,
    the batch layout and the tokenizer; the recipe then calls :meth:`load_prompts`, :meth:`build_policy`, builds
    its own models and calls :meth:`resume`, so that every model resumes from the same checkpoint.
    """

    def __init__(self, cfg: PolicyRunConfig, tag: str, stop: Optional[GracefulStop] = None):
        self.cfg, self.tag = cfg, tag
        self.stop = stop or GracefulStop()
        initialize_distributed(cfg.parallel, num_attention_heads=cfg.model.num_attention_heads,
                               num_query_groups=cfg.model.num_query_groups, num_layers=cfg.model.num_layers)
        self.checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                          resume_from=cfg.resume_from)
        self.data_parallel = DataParallel.from_parallel_state()
        if cfg.rollout.prompts_per_step % self.data_parallel.size:
            raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                              f"data-parallel size {self.data_parallel.size}")
        # The policy's shape: the preset's, or the init_from checkpoint's (the config picks how it runs).
        self.policy_cfg = cfg.model if cfg.init_from is None else read_checkpoint_model_config(
            cfg.init_from, run_as=cfg.model)
        if self.checkpoint is not None:
            check_resumed_model(self.checkpoint, self.policy_cfg)
        self.tokenizer = load_tokenizer(self.policy_cfg.tokenizer_source)
        self.vocab_size = len(self.tokenizer)
        self.seq_length = cfg.data.max_prompt_tokens + max(cfg.rollout.sampling.max_new_tokens,
                                                           cfg.eval.max_new_tokens)
        check_update_layout(cfg.ppo, cfg.rollout.sequences_per_step, self.data_parallel.size)
        # Optimizer steps per RL step (sizes the learning-rate schedules).
        self.updates_per_step = cfg.ppo.ppo_epochs * (cfg.rollout.sequences_per_step // cfg.ppo.mini_batch_size)
        self.extra_models: dict[str, TrainedModel] = {}
        self.start_step, self.eval_before = 0, None
        self.last_metrics: dict[str, float] = {}
        self.step_times: list[float] = []
        self.step = self.final_step = cfg.train.steps
        # train.kl_budget: the newest policy measured within it (step, KL, weights) and the step that passed it.
        self.within_budget: Optional[dict] = None
        self.kl_budget_passed: Optional[dict] = None

    # -- set-up (called by the recipe, in this order) ------------------------------------------------------

    def load_prompts(self) -> None:
        cfg = self.cfg
        self.train_prompts = load_prompts(cfg.data.train, self.tokenizer, cfg.data.max_prompt_tokens,
                                          split=cfg.data.train_split, chat_template=cfg.data.chat_template)
        print_rank_zero(f"[{self.tag}] {len(self.train_prompts)} training prompts from {cfg.data.train}"
                        + (f" (skipped {self.train_prompts.skipped})" if self.train_prompts.skipped else ""))
        # The step's prompts are a function of the step, so a resumed run sees the same data.
        self.prompt_stream = EpochStream([[i] for i in range(len(self.train_prompts))], cfg.train.seed)
        self.eval_prompts: Optional[PromptSet] = None
        if cfg.data.eval and (cfg.eval.before or cfg.eval.after):
            self.eval_prompts = load_prompts(cfg.data.eval, self.tokenizer, cfg.data.max_prompt_tokens,
                                             split=cfg.data.eval_split, chat_template=cfg.data.chat_template,
                                             limit=cfg.eval.num_prompts)

    def build_policy(self) -> None:
        """The policy (trains), its optimizer and the frozen reference; the KL controller."""
        cfg = self.cfg
        self.policy, self.reference, self.hf_config = build_policy_and_reference(
            self.policy_cfg, cfg.init_from, cfg.optim, self.seq_length, offload_reference=cfg.offload_frozen_models,
            lora=cfg.lora)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim,
                                                         cfg.train.steps * self.updates_per_step)
        configure_for_training(self.policy, self.optimizer)
        kl = cfg.kl
        self.kl_controller = (AdaptiveKLController(kl.init_coef, kl.target, kl.horizon)
                              if kl.controller == "adaptive" else FixedKLController(kl.init_coef))

    def frozen_value_model(self, path: str, kinds: tuple[str, ...], **kwargs) -> LocalValueModel:
        """A frozen GVM or reward model in this process, refused unless it reads the policy's tokens."""
        scorer = LocalValueModel(path, self.policy_cfg.precision, self.seq_length, kinds=kinds,
                                 rows=self.cfg.rollout.forward_micro_batch_size,
                                 offload=self.cfg.offload_frozen_models, **kwargs)
        self.check_scorer(scorer.info, path)
        return scorer

    def check_scorer(self, info: ScorerInfo, where: str) -> None:
        check_scorer_matches_policy(info, self.tokenizer, self.policy_cfg.vocab_size, self.cfg.data.chat_template,
                                    where=where)

    def add_trained_model(self, name: str, trained: TrainedModel) -> None:
        """A further model the algorithm trains (PPO's critic): checkpointed and resumed with the policy."""
        self.extra_models[name] = trained

    def resume(self) -> None:
        """Restore the policy, the extra models and the run's state from the checkpoint, if resuming."""
        checkpoint, cfg = self.checkpoint, self.cfg
        if cfg.resume and checkpoint is None:
            print_rank_zero(f"[{self.tag}] resume=true but {cfg.run_dir} has no checkpoint yet: starting fresh")
        if checkpoint is not None:
            state = load_training_checkpoint(checkpoint, self.policy, self.optimizer, self.scheduler,
                                             extra_models=self.extra_models)
            self.start_step = state["step"]
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.eval_before = state.get("eval_before")
            print_rank_zero(f"[{self.tag}] resumed from {checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(cfg.run_dir, resume_step=self.start_step if checkpoint else None)

    # -- the loop ------------------------------------------------------------------------------------------

    @contextmanager
    def stopping(self) -> Iterator[None]:
        """Signals stop the run after a step (with a checkpoint) while this is active."""
        with self.stop:
            yield

    def steps(self, postfix: tuple[str, ...] = ()) -> Iterator[int]:
        """The steps still to run, with a progress bar; after each, a periodic checkpoint and the stop check."""
        total = self.cfg.train.steps
        with progress_bar(total, initial=self.start_step, description=self.tag) as bar:
            for step in range(self.start_step, total):
                started = time.perf_counter()
                self.step = step
                yield step
                self.step_times.append(time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix({name.split("/")[-1]: f"{self.last_metrics[name]:.3g}" for name in postfix
                                 if name in self.last_metrics})
                if self.kl_budget_passed is not None:
                    self.return_to_within_budget()
                    break
                self.checkpoint_and_maybe_stop(step + 1)

    def step_prompts(self, step: int) -> tuple[list[list[int]], list[dict]]:
        """This rank's prompts of ``step`` (each repeated ``samples_per_prompt`` times) and their records."""
        per_step, repeats = self.cfg.rollout.prompts_per_step, self.cfg.rollout.samples_per_prompt
        indices = self.data_parallel.shard(self.prompt_stream.positions(step * per_step, (step + 1) * per_step))
        return ([self.train_prompts.token_ids[i] for i in indices for _ in range(repeats)],
                [self.train_prompts.records[i] for i in indices for _ in range(repeats)])

    def sampling(self, step: int) -> SamplingConfig:
        return dataclasses.replace(self.cfg.rollout.sampling,
                                   seed=derive_seed(self.cfg.train.seed, "rollout", step, self.data_parallel.rank))

    def sample(self, step: int, prompt_ids: list[list[int]]) -> Sample:
        rollout = self.cfg.rollout
        return sample_rollout(self.policy, self.tokenizer, prompt_ids, self.sampling(step),
                              old_logprobs=rollout.old_logprobs, vocab_size=self.vocab_size,
                              micro_batch_size=rollout.forward_micro_batch_size)

    def reference_logprobs(self, sample: Sample) -> torch.Tensor:
        rollout = self.cfg.rollout
        with offloaded(self.reference or [], enabled=self.cfg.offload_frozen_models), \
                reference_model(self.reference, self.policy) as reference:
            logprobs, _ = token_logprobs(reference, sample.tokens, sample.response_mask,
                                         vocab_size=self.vocab_size, temperature=rollout.sampling.temperature,
                                         micro_batch_size=rollout.forward_micro_batch_size)
        return logprobs

    def phase_timer(self) -> PhaseTimer:
        return PhaseTimer()

    @contextmanager
    def scorer_guard(self, completed: int) -> Iterator[None]:
        """A value or reward server that stays unreachable ends the run with a checkpoint after the last
        full step (``completed`` steps), and an error that says how to continue."""
        try:
            yield
        except ScorerUnavailable as error:
            saved = self.save(completed) if completed > 0 else None
            where = (f"with a checkpoint after step {completed} ({saved})" if saved else
                     "before its first step (nothing to save)")
            raise NemoDvpoError(f"{error}. The run stopped {where}: restart the server, then run the same "
                                "command with resume=true to continue") from None

    def update_policy(self, step: int, trajectory: Trajectory, update: PolicyUpdateConfig,
                      kl_loss_coef: float) -> dict[str, float]:
        """PPO's clipped surrogate (plus ``kl_loss_coef * k3`` and the entropy bonus) over ``update.ppo_epochs``
        passes of mini-batches of the trajectory; returns the averaged metrics."""

        def loss(outputs: dict[str, torch.Tensor], batch: Trajectory, global_tokens: torch.Tensor):
            result = policy_loss(outputs["logprobs"], batch.old_logprobs, batch.ref_logprobs, batch.advantages,
                                 batch.response_mask, clip=update.clip, kl_loss_coef=kl_loss_coef,
                                 entropy=outputs.get("entropy"), entropy_coef=update.entropy_coef,
                                 token_count=global_tokens)
            logged = {"pg_loss": result.pg_loss, "kl_loss": result.kl_loss, "clip_fraction": result.stats.clip_fraction,
                      "approx_kl": result.stats.approx_kl, "ratio_mean": result.stats.ratio_mean}
            if "entropy" in outputs:
                logged["entropy"] = result.entropy
            return result.loss, logged

        outputs = LogprobOutputs(self.vocab_size, self.cfg.rollout.sampling.temperature,
                                 entropy="loss" if update.entropy_coef > 0 else "log")
        schedule = MiniBatchSchedule(update.ppo_epochs, update.mini_batch_size, update.micro_batch_size)
        return minibatch_update(self.policy, self.optimizer, self.scheduler, trajectory, loss, outputs=outputs,
                                schedule=schedule, data_parallel=self.data_parallel,
                                seed=(self.cfg.train.seed, "ppo", step))

    def rollout_metrics(self, sample: Sample, trajectory: Trajectory, records: list[dict],
                        values_name: str) -> dict[str, float]:
        """``rollout/*`` means over the global batch: token means over response tokens, sequence means over
        rows, and the verifiable score over the rollouts whose prompts carry verifiable fields (every rank
        reduces the same names, whichever of its prompts are verifiable)."""
        from nemo_dvpo.data.verifiable import score_response

        mask = trajectory.response_mask.float()
        rows = float(mask.shape[0])
        kl = kl_estimate(trajectory.old_logprobs, trajectory.ref_logprobs, "k1") * mask
        last = (trajectory.sequence_lengths - 1).clamp(min=0)
        advantages = trajectory.advantages * mask
        tokens = float(mask.sum())
        sums = {
            f"{values_name}_mean": (float((trajectory.values * mask).sum()), tokens),
            f"{values_name}_last_token": (float(trajectory.values.gather(1, last[:, None]).sum()), rows),
            "advantage_mean": (float(advantages.sum()), tokens),
            "advantage_sq_mean": (float((advantages ** 2).sum()), tokens),
            "kl": (float(kl.sum()), rows),
            "kl_per_token": (float(kl.sum()), tokens),
            "response_length": (tokens, rows),
        }
        if sample.entropy is not None:
            sums["entropy"] = (float((sample.entropy * mask).sum()), tokens)
        verifiable = [score_response(record, text) for record, text in zip(records, sample.generation.response_texts)
                      if "instruction_id_list" in record]
        sums["verifiable_score"] = (float(sum(verifiable)), float(len(verifiable)))
        means = self.data_parallel.ratio({name: total for name, (total, _) in sums.items()},
                                         {name: count for name, (_, count) in sums.items()})
        all_tokens = float(self.data_parallel.sum(mask.sum()))
        # The tokens' (Bessel-corrected) standard deviation from the global sums.
        mean_square = means.pop("advantage_sq_mean")
        variance = (mean_square - means["advantage_mean"] ** 2) * all_tokens / max(all_tokens - 1, 1)
        means["advantage_std"] = max(variance, 0.0) ** 0.5
        means["kl_coef"] = self.kl_controller.value
        self.watch_kl_budget(means["kl"])
        return {f"rollout/{name}": value for name, value in means.items()}

    # -- the KL budget -------------------------------------------------------------------------------------

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the updates change: every weight, or with LoRA the adapters only (the base never moves)."""
        return [param for module in self.policy for param in unwrap_model(module).parameters() if param.requires_grad]

    def watch_kl_budget(self, kl: float) -> None:
        """Given the rollout KL of the current policy (the one after ``self.step`` updates): keep a copy of it
        while it is within ``train.kl_budget``; mark the step that passes it (every rank sees the same global KL,
        so all stop together).

        The copy holds the trained parameters only, once per model-parallel shard: data-parallel replicas are
        identical, so data-parallel rank 0 keeps it (in host memory, overwritten in place each step - a run holds
        at most one) and :meth:`return_to_within_budget` broadcasts it."""
        budget = self.cfg.train.kl_budget
        if budget is None:
            return
        if kl > budget:
            self.kl_budget_passed = {"step": self.step, "kl": kl}
            return
        weights = None
        if self.data_parallel.rank == 0:
            trained = self._trained_parameters()
            if self.within_budget is None:
                weights = [param.detach().to("cpu", copy=True) for param in trained]
            else:
                weights = self.within_budget["weights"]
                for kept, param in zip(weights, trained):
                    kept.copy_(param.detach())
        self.within_budget = {"step": self.step, "kl": kl, "weights": weights}

    def return_to_within_budget(self) -> None:
        """The budget was passed: put back the newest policy measured within it (this step's update is discarded)
        and end the loop; the final evaluation, save and export then use that policy."""
        passed, kept, budget = self.kl_budget_passed, self.within_budget, self.cfg.train.kl_budget
        if kept is None:
            # Only after a resume whose first measured policy is already over the budget: nothing older is held.
            self.final_step = passed["step"] + 1
            print_rank_zero(f"[{self.tag}] rollout KL {passed['kl']:.3g} at step {passed['step'] + 1} passed "
                            f"train.kl_budget={budget:g}; no earlier policy of this run is in memory (it resumed "
                            "past it): stopping with the current policy")
            return
        with torch.no_grad():
            if kept["weights"] is not None:
                for param, weights in zip(self._trained_parameters(), kept["weights"]):
                    param.copy_(weights)
        if self.data_parallel.size > 1:
            for module in self.policy:
                module.broadcast_params()  # Megatron DDP: from data-parallel rank 0 to the other replicas
        self.final_step = kept["step"]
        print_rank_zero(f"[{self.tag}] rollout KL {passed['kl']:.3g} at step {passed['step'] + 1} passed "
                        f"train.kl_budget={budget:g}: stopping; the final policy is the one after {kept['step']} "
                        f"steps (rollout KL {kept['kl']:.3g})")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last_metrics = metrics
        self.logger.log(step + 1, metrics)

    def evaluate(self, when: str) -> Optional[dict]:
        """The verifiable score of the policy's greedy answers; a stop signal during it stops the run."""
        total = self.cfg.train.steps
        return evaluate_policy(self.policy, self.tokenizer, self.eval_prompts, self.data_parallel, self.cfg.eval,
                               self.stop, self.tag, when,
                               # After training, a checkpoint of the last step lets resume=true run only the rest.
                               on_stop=lambda: (total, self.save(total)) if when == "after" else
                               (self.start_step, self.checkpoint), total_steps=total)

    def evaluate_before(self) -> None:
        if self.eval_before is None and self.cfg.eval.before:
            self.eval_before = self.evaluate("before")

    def checkpoint_and_maybe_stop(self, completed: int) -> None:
        steps = self.cfg.train.steps
        checkpoint = None
        if completed % self.cfg.train.save_every == 0 and completed < steps:
            checkpoint = self.save(completed)
        # Every rank asks at the same point, so one rank's signal stops all of them after this step.
        if completed < steps and self.stop.should_stop():
            raise TrainingStopped(stopped_message(self.tag, self.stop.signal_name, completed, steps,
                                                  checkpoint or self.save(completed)))

    def save(self, step: int, metadata: Optional[dict] = None) -> Path:
        return save_training_checkpoint(self.cfg.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                        self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                                        trainer_state={"kl_controller": self.kl_controller.state_dict(),
                                                       "eval_before": self.eval_before},
                                        metadata=metadata, keep_last=self.cfg.train.keep_last,
                                        extra_models=self.extra_models)

    def finish(self, extra_summary: dict, metadata: Optional[dict] = None) -> dict:
        """Score the final policy, save and export it, and write ``summary.json`` (returned)."""
        eval_after = self.evaluate("after") if self.cfg.eval.after else None
        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final"
        self.policy = finalize_policy(self.policy)
        save_model_checkpoint(self.policy, final, self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                              extra={**(metadata or {}), "step": self.final_step})
        for name, trained in self.extra_models.items():
            save_model_checkpoint(trained.model, run_dir / f"final_{name}", trained.model_cfg, trained.hf_config,
                                  self.tokenizer, kind=trained.kind, extra={"step": self.cfg.train.steps})
        hf_dir = export_model_to_hf(self.policy, self.hf_config, self.tokenizer, run_dir / "hf",
                                    exported_from=str(final)) if self.cfg.export_hf else None
        budget, final_kl = None, self.last_metrics.get("rollout/kl")
        if self.cfg.train.kl_budget is not None:
            passed = self.kl_budget_passed or {}
            if passed and self.within_budget:
                final_kl = self.within_budget["kl"]  # the returned-to policy's, not the discarded one's
            budget = {"budget": self.cfg.train.kl_budget, "final_policy_step": self.final_step,
                      "passed_at_step": passed["step"] + 1 if passed else None, "passed_with_kl": passed.get("kl")}
        return write_summary(run_dir, {**extra_summary, "final_kl": final_kl,
                                       "final_kl_coef": self.kl_controller.value, "kl_budget": budget},
                             self.eval_before, eval_after, self.step_times, final, hf_dir)

    def cleanup(self) -> None:
        self.logger.close()


def evaluate_policy(policy, tokenizer, prompts: Optional[PromptSet], data_parallel: DataParallel, eval_cfg: EvalConfig,
                    stop: GracefulStop, tag: str, when: str, on_stop, total_steps: int) -> Optional[dict]:
    """The verifiable score of the policy's greedy answers to the held-out ``prompts`` (None: not evaluated).

    A stop signal during it ends the run: ``on_stop()`` returns ``(completed_steps, checkpoint)`` for the message.
    """
    if prompts is None:
        return None
    started = time.perf_counter()
    try:
        result = evaluate_verifiable(policy, tokenizer, prompts, data_parallel, batch_size=eval_cfg.batch_size,
                                     max_new_tokens=eval_cfg.max_new_tokens, should_stop=stop.should_stop)
    except EvaluationInterrupted:
        completed, checkpoint = on_stop()
        raise TrainingStopped(stopped_message(tag, stop.signal_name, completed, total_steps, checkpoint)) from None
    print_rank_zero(f"[{tag}] held-out verifiable score {when} training: {result['mean']:.4f} +- "
                    f"{result['ci95']:.4f} over {result['num_prompts']} prompts "
                    f"({time.perf_counter() - started:.0f} s)")
    return result


def write_summary(run_dir: Path, fields: dict, eval_before: Optional[dict], eval_after: Optional[dict],
                  step_times: list[float], final: Path, hf_dir: Optional[Path]) -> dict:
    """A policy run's ``summary.json`` (rank 0 writes it; every rank returns it): ``fields``, the verifiable
    scores before and after with their paired change, the step time, peak memory and where the policy is."""
    summary = {
        **fields,
        "verifiable_score_change": paired_change(eval_before, eval_after),
        "verifiable_score_before": eval_before,
        "verifiable_score_after": eval_after,
        "steps_this_run": len(step_times),
        "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else None,
        "peak_memory_mib": peak_memory_mib(),
        "policy_checkpoint": str(final),
        "hf_export": str(hf_dir) if hf_dir else None,
    }
    if is_rank_zero():
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _number(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _gvm_accuracy(accuracy: dict) -> str:
    text = f"mean-token {accuracy['mean']:.3f}, last-token {accuracy['last']:.3f}"
    pairs = accuracy.get("pairs")
    if not pairs:  # GVMs saved before the pair count was recorded
        return text
    low, high = wilson_interval(round(accuracy["mean"] * pairs), pairs)
    return f"{text} on {pairs} pairs (mean-token 95% interval {low:.2f}-{high:.2f})"


def what_the_change_shows(change: dict, steps: Optional[int]) -> str:
    """One plain sentence on what a run's paired held-out change can and cannot support.

    A change inside its own 95% interval is no evidence either way, and the interval's half-width is the
    smallest effect that evaluation could have seen - a short run (the embedded default: 6 steps, 32
    prompts) shows the pipeline working, not the method's effect.
    """
    mean, half_width, prompts = change["mean"], change["ci95"], change["num_prompts"]
    ran = f"a run of {steps} steps" if steps else "this run"
    if half_width != half_width or abs(mean) <= half_width:  # NaN (one prompt) or an interval spanning 0
        return (f"no measurable change: {prompts} held-out prompts only detect changes beyond +-{half_width:.3f}; "
                f"{ran} shows the pipeline working (GVM, rollouts, KL, export), not whether the policy improved. "
                "A measured gain takes hundreds of held-out prompts and tens of steps (docs/benchmarks.md, Stage 2)")
    direction = "raised" if mean > 0 else "lowered"
    return (f"{ran} {direction} the held-out verifiable score by {abs(mean):.3f} (95% interval excludes 0, "
            f"{prompts} prompts); check it on a benchmark nobody here wrote (tools/eval_benchmarks.py)")


def format_summary(title: str, summary: dict) -> str:
    """The end-of-run summary of an RL (or DPO) run, for the terminal: the lines its ``summary.json`` supports."""
    def score(result: Optional[dict]) -> str:
        if not result:
            return "not evaluated"
        return (f"{result['mean']:.4f} +- {result['ci95']:.4f} (95% CI, {result['num_prompts']} prompts; "
                f"all instructions followed: {result['all_followed']:.1%})")

    change = summary.get("verifiable_score_change")
    step_s = summary.get("median_step_s")
    lines = [f"{title} summary"]
    if "gvm" in summary:
        accuracy = summary.get("gvm_heldout_accuracy")
        lines += [f"  GVM                        {summary['gvm']}",
                  "  GVM held-out accuracy      " + (_gvm_accuracy(accuracy) if accuracy
                                                     else "not recorded in the GVM checkpoint")]
    if "reward_model" in summary:
        lines.append(f"  reward model               {summary['reward_model']}")
    if "heldout_pair_accuracy" in summary:
        lines.append(f"  held-out pair accuracy     {_number(summary['heldout_pair_accuracy'], 3)}")
    lines += [
        f"  verifiable score before    {score(summary.get('verifiable_score_before'))}",
        f"  verifiable score after     {score(summary.get('verifiable_score_after'))}",
        "  change (paired)            " + (f"{change['mean']:+.4f} +- {change['ci95']:.4f} (95% CI)" if change
                                            else "not evaluated"),
    ]
    if change:
        lines.append("  what this shows            " + what_the_change_shows(change, summary.get("steps_this_run")))
    if "final_kl" in summary:
        lines.append(f"  final KL (sequence, k1)    {_number(summary['final_kl'])}   "
                     f"KL coefficient {summary['final_kl_coef']:.4f}")
    budget = summary.get("kl_budget")
    if budget:
        lines.append(f"  KL budget                  {budget['budget']:g}: " + (
            f"passed at step {budget['passed_at_step']} (KL {budget['passed_with_kl']:.3g}); the final policy is "
            f"the one after {budget['final_policy_step']} steps" if budget["passed_at_step"] else "never passed"))
    lines += [
        "  time per step (median)     " + (f"{step_s:.1f} s over {summary['steps_this_run']} steps" if step_s
                                            else "no step ran"),
        f"  peak memory                {summary['peak_memory_mib']:.0f} MiB",
        f"  policy checkpoint          {summary['policy_checkpoint']}",
        f"  Hugging Face export        {summary['hf_export']}",
    ]
    return "\n".join(lines)
