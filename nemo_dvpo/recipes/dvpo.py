"""Stage 2 of DVPO: optimise the policy with PPO against a frozen Global Value Model.

Three models take part: the policy (the only one with gradients and optimizer state), a frozen reference
(the KL anchor) and the frozen GVM, in this process or served (:mod:`nemo_dvpo.rlhf.scorers`). No reward
model, no critic. ``DVPORecipe.train()`` is the algorithm, one numbered step per line of the paper's box;
the parts it calls are shared with the other algorithms (:mod:`nemo_dvpo.rlhf`) and the objective is pure
functions (:mod:`nemo_dvpo.algorithms.dvpo`). Before the first step and after the last, the policy's
greedy answers to held-out verifiable prompts are scored with the IFEval checkers; the final policy is
saved and exported as a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from nemo_dvpo.algorithms.dvpo import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    kl_estimate,
    policy_loss,
)
from nemo_dvpo.checkpointing.model_checkpoint import (
    load_hf_config_from_checkpoint,
    load_sharded_weights,
    read_checkpoint_model_config,
    save_model_checkpoint,
)
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import load_training_checkpoint, save_training_checkpoint
from nemo_dvpo.data.prompts import PromptSet, load_prompts
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.evaluation.verifiable import EvaluationInterrupted, evaluate_verifiable, paired_change
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config, unwrap_model
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.conversion import export_model_to_hf
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.rlhf.rollout import Sample, sample_rollout, token_logprobs
from nemo_dvpo.rlhf.scorers import LocalGVM, ValueScorer, check_scorer_matches_policy
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.rlhf.update import LogprobOutputs, MiniBatchSchedule, minibatch_update
from nemo_dvpo.serving.gvm_client import GVMClientConfig, RemoteGVM, ScorerUnavailable, is_url
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.metrics import MetricsLogger, peak_memory_mib, progress_bar
from nemo_dvpo.training.offload import move_parameters, offload_enabled, offloaded
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils.distributed import (
    ParallelConfig,
    initialize_distributed,
    is_rank_zero,
    model_parallel_group,
    print_rank_zero,
)
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError, TrainingStopped
from nemo_dvpo.utils.seeding import derive_seed

# -- configuration: every default lives here (conf/dvpo.yaml holds the embedded default's overrides) ------


@dataclass
class PromptDataConfig:
    # RL prompts: JSONL records with "prompt" (verifiable fields make the rollouts' scores loggable).
    train: str = "data/smollm2_ifeval/prompts.jsonl"
    # Keep only records whose "split" field is this (null: every record).
    train_split: Optional[str] = "train"
    # Held-out verifiable prompts whose greedy answers are scored before and after training (null: none).
    eval: Optional[str] = "data/smollm2_ifeval/prompts_heldout.jsonl"
    eval_split: Optional[str] = None
    # Longer prompts (after the chat template) are skipped and counted.
    max_prompt_tokens: int = 192
    # Prompts go through the tokenizer's chat template (the GVM must have been trained the same way).
    chat_template: bool = True


@dataclass
class RolloutConfig:
    # Prompts per step over all data-parallel ranks, and responses drawn per prompt.
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
    # How responses are drawn (temperature, top-k / top-p, max_new_tokens, EOS).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0))
    # Sequences per forward pass when scoring a rollout (old/reference log-probs, GVM values).
    forward_micro_batch_size: int = 8
    # PPO's old log-probs: "generation" takes those the sampler computed (free; exact when no top-k /
    # top-p filter reshapes the sampling distribution), "recompute" runs a policy forward pass.
    old_logprobs: Literal["generation", "recompute"] = "generation"

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.samples_per_prompt < 1 or self.forward_micro_batch_size < 1:
            raise ConfigError("rollout.prompts_per_step, rollout.samples_per_prompt and "
                              "rollout.forward_micro_batch_size must be >= 1")
        if self.old_logprobs == "generation" and (self.sampling.top_k != 0 or self.sampling.top_p != 1.0):
            raise ConfigError("rollout.old_logprobs=generation needs rollout.sampling.top_k=0 and top_p=1: with a "
                              "filter the sampler's log-probs are not the policy's; set rollout.old_logprobs=recompute")
        if self.sampling.is_greedy:
            raise ConfigError("rollout.sampling must sample (temperature > 0, greedy=false): PPO needs "
                              "log-probs of a stochastic policy")


@dataclass
class PPOConfig:
    # Passes over each step's rollout.
    ppo_epochs: int = 4
    # Sequences per optimizer step over all data-parallel ranks, and per forward/backward on a rank.
    mini_batch_size: int = 2
    micro_batch_size: int = 2
    # PPO's ratio clip epsilon.
    clip: float = 0.2
    # "value": the paper's batch-normalised GVM value; "gae": the authors' code (KL rewards + GAE).
    advantage_mode: Literal["value", "gae"] = "value"
    # GAE's discount and lambda (mode "gae").
    gamma: float = 1.0
    lam: float = 0.95
    # Normalise GVM values by the batch ("batch") or by the statistics stored with the GVM ("gvm").
    value_normalization: Literal["batch", "gvm"] = "batch"
    # Weight of the entropy bonus (0: none; the entropy is still logged in the first epoch).
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "mini_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.clip <= 0:
            raise ConfigError(f"ppo.clip must be > 0, got {self.clip}")


@dataclass
class KLConfig:
    # "adaptive" (Ziegler et al.) or "fixed" coefficient.
    controller: Literal["adaptive", "fixed"] = "adaptive"
    init_coef: float = 0.2
    # Adaptive: the sequence-level KL (sum over response tokens, mean over sequences) steered to,
    # and the number of sequences over which the coefficient adapts.
    target: float = 6.0
    horizon: int = 10000
    # "reward": -beta * (logp - ref_logp) per token inside GAE (mode "gae" only); "loss": beta * k3
    # added to the policy loss; "auto": reward for "gae", loss for "value".
    placement: Literal["auto", "reward", "loss"] = "auto"

    def __post_init__(self) -> None:
        if self.init_coef < 0:
            raise ConfigError(f"kl.init_coef must be >= 0, got {self.init_coef}")


@dataclass
class EvalConfig:
    # Held-out prompts scored (the first N of data.eval), prompts per generation batch, answer length.
    num_prompts: int = 64
    batch_size: int = 32
    max_new_tokens: int = 160
    # Score the starting policy, and the final one.
    before: bool = True
    after: bool = True


@dataclass
class DVPOTrainConfig:
    # Policy-optimisation steps (one rollout each).
    steps: int = 16
    seed: int = 1234
    # Checkpoint every N steps, keeping the newest ``keep_last``.
    save_every: int = 8
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.save_every < 1:
            raise ConfigError("train.steps and train.save_every must be >= 1")


@dataclass
class DVPORecipeConfig:
    model: ModelConfig
    # Checkpoints, final/ (policy), hf/ (export), summary.json, metrics.jsonl, tensorboard/ go here.
    run_dir: str = "runs/dvpo"
    # Continue from run_dir/checkpoints/latest; or from the checkpoint ``resume_from``.
    resume: bool = False
    resume_from: Optional[str] = None
    # Start over in a run_dir that already holds a run, removing only that run's own files.
    overwrite: bool = False
    # A trained GVM checkpoint (kind "gvm"), or the URL(s) of GVM servers (examples/serve_gvm.py,
    # comma-separated replicas); null trains one first with stage 1 (see ``gvm_training``).
    gvm: Optional[str] = None
    # Stage-1 overrides (conf/gvm.yaml keys) for the GVM trained when ``gvm`` is null.
    gvm_training: dict = field(default_factory=dict)
    # Tensor-parallel size of an in-process GVM: null runs it at the policy's layout (TP and PP); a number
    # runs it on its own process groups at that TP size without pipeline parallelism (dividing the world).
    gvm_tensor_model_parallel_size: Optional[int] = None
    # How to talk to a served GVM (gvm=http://host:port[,http://host2:port]): timeouts, retries, token.
    gvm_client: GVMClientConfig = field(default_factory=GVMClientConfig)
    # A nemo_dvpo checkpoint to start the policy (and reference) from; null takes model.source.
    init_from: Optional[str] = None
    # Keep the frozen reference and GVM in CPU memory except during their forward passes (GPU).
    offload_frozen_models: bool = False
    # Export the final policy as a Hugging Face folder (run_dir/hf).
    export_hf: bool = True
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: DVPOTrainConfig = field(default_factory=DVPOTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, decay_style="constant"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.kl.placement == "reward" and self.ppo.advantage_mode == "value":
            raise ConfigError("kl.placement=reward needs ppo.advantage_mode=gae: in mode 'value' the advantage "
                              "is the normalised GVM value and has no reward stream; use kl.placement=loss")
        size = self.gvm_tensor_model_parallel_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"gvm_tensor_model_parallel_size must be null or a positive integer, got {size!r}")
        if size is not None and is_url(self.gvm):
            raise ConfigError("gvm_tensor_model_parallel_size applies to a GVM in this process, not to a served "
                              f"one (gvm={self.gvm}): the server chooses its own layout")

    @property
    def kl_in_reward(self) -> bool:
        return self.kl.placement == "reward" or (self.kl.placement == "auto" and self.ppo.advantage_mode == "gae")


def freeze(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    for module in model:
        module.eval()
        module.requires_grad_(False)
    return model


# -- the recipe ------------------------------------------------------------------------------------------


class DVPORecipe:
    """``setup`` wires config -> models, data, optimizer; ``train()`` is the algorithm; ``cleanup`` closes logs."""

    def __init__(self, cfg: DVPORecipeConfig, gvm: str, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.gvm = gvm
        self.stop = stop or GracefulStop()
        self.setup()

    def setup(self) -> None:
        cfg, rollout, ppo = self.cfg, self.cfg.rollout, self.cfg.ppo
        initialize_distributed(cfg.parallel, num_attention_heads=cfg.model.num_attention_heads,
                               num_query_groups=cfg.model.num_query_groups, num_layers=cfg.model.num_layers)
        checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                     resume_from=cfg.resume_from)
        self.data_parallel = DataParallel.from_parallel_state()
        dp = self.data_parallel.size
        sequences = rollout.prompts_per_step * rollout.samples_per_prompt
        if rollout.prompts_per_step % dp:
            raise ConfigError(f"rollout.prompts_per_step={rollout.prompts_per_step} must be a multiple of the "
                              f"data-parallel size {dp}")
        if sequences % ppo.mini_batch_size or ppo.mini_batch_size % dp or \
                (ppo.mini_batch_size // dp) % ppo.micro_batch_size:
            raise ConfigError(
                f"ppo.mini_batch_size={ppo.mini_batch_size} must divide the {sequences} sequences of a step "
                f"(rollout.prompts_per_step x rollout.samples_per_prompt) and split into data-parallel size "
                f"{dp} x micro-batches of ppo.micro_batch_size={ppo.micro_batch_size}")

        # The policy's shape: the preset's, or the init_from checkpoint's (the config picks the precision).
        policy_cfg = cfg.model if cfg.init_from is None else dataclasses.replace(
            read_checkpoint_model_config(cfg.init_from), precision=cfg.model.precision)
        if checkpoint is not None:
            check_resumed_model(checkpoint, policy_cfg)
        self.policy_cfg = policy_cfg
        self.tokenizer = load_tokenizer(policy_cfg.tokenizer_source)
        self.vocab_size = len(self.tokenizer)
        seq_length = cfg.data.max_prompt_tokens + max(rollout.sampling.max_new_tokens, cfg.eval.max_new_tokens)

        # Frozen value model first: a GVM that does not fit the policy fails before the policy is built.
        self.scorer: ValueScorer = (
            RemoteGVM(self.gvm, cfg.gvm_client, group=model_parallel_group()) if is_url(self.gvm) else
            LocalGVM(self.gvm, policy_cfg.precision, seq_length, tensor_parallel=cfg.gvm_tensor_model_parallel_size,
                     rows=rollout.forward_micro_batch_size, offload=cfg.offload_frozen_models))
        check_scorer_matches_policy(self.scorer.info, self.tokenizer, policy_cfg.vocab_size, cfg.data.chat_template,
                                    where=self.gvm)
        if ppo.value_normalization == "gvm" and not self.scorer.info.value_stats:
            raise ConfigError(f"ppo.value_normalization=gvm but the GVM at {self.gvm} stores no value statistics")

        # Data: RL prompts (step order a function of the step, so a resumed run sees the same data).
        self.train_prompts = load_prompts(cfg.data.train, self.tokenizer, cfg.data.max_prompt_tokens,
                                          split=cfg.data.train_split, chat_template=cfg.data.chat_template)
        print_rank_zero(f"[dvpo] {len(self.train_prompts)} training prompts from {cfg.data.train}"
                        + (f" (skipped {self.train_prompts.skipped})" if self.train_prompts.skipped else ""))
        self.prompt_stream = EpochStream([[i] for i in range(len(self.train_prompts))], cfg.train.seed)
        self.eval_prompts: Optional[PromptSet] = None
        if cfg.data.eval and (cfg.eval.before or cfg.eval.after):
            self.eval_prompts = load_prompts(cfg.data.eval, self.tokenizer, cfg.data.max_prompt_tokens,
                                             split=cfg.data.eval_split, chat_template=cfg.data.chat_template,
                                             limit=cfg.eval.num_prompts)

        # Policy (trains) and reference (a frozen copy of the starting policy, not a second load).
        if cfg.init_from is None:
            self.hf_config = resolve_hf_config(policy_cfg)
            build_kwargs = {}
        else:
            self.hf_config = load_hf_config_from_checkpoint(cfg.init_from)
            build_kwargs = {"hf_config": self.hf_config, "load_weights": False,
                            "transform": lambda model: _loaded(model, Path(cfg.init_from) / "weights")}
        self.policy = build_gpt_model(policy_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(cfg.optim),
                                      seq_length=seq_length, **build_kwargs)
        self.reference = freeze(build_gpt_model(policy_cfg, hf_config=self.hf_config, load_weights=False,
                                                seq_length=seq_length))
        unwrap_model(self.reference[0]).load_state_dict(unwrap_model(self.policy[0]).state_dict())
        if offload_enabled(cfg.offload_frozen_models):
            move_parameters(self.reference, "cpu")

        updates_per_step = ppo.ppo_epochs * (sequences // ppo.mini_batch_size)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim, cfg.train.steps * updates_per_step)
        configure_for_training(self.policy, self.optimizer)
        self.kl_controller = (AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
                              if cfg.kl.controller == "adaptive" else FixedKLController(cfg.kl.init_coef))

        self.start_step, self.eval_before, self.resumed_from = 0, None, checkpoint
        if cfg.resume and checkpoint is None:
            print_rank_zero(f"[dvpo] resume=true but {cfg.run_dir} has no checkpoint yet: starting fresh")
        if checkpoint is not None:
            state = load_training_checkpoint(checkpoint, self.policy, self.optimizer, self.scheduler)
            self.start_step = state["step"]
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.eval_before = state.get("eval_before")
            print_rank_zero(f"[dvpo] resumed from {checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(cfg.run_dir, resume_step=self.start_step if checkpoint else None)

    # -- the algorithm -------------------------------------------------------------------------------------

    def train(self) -> dict:
        with self.stop:
            return self._train()

    def _train(self) -> dict:
        cfg = self.cfg
        if self.eval_before is None and cfg.eval.before:
            self.eval_before = self.evaluate("before", completed=self.start_step, checkpoint=self.resumed_from)
        step_times: list[float] = []
        metrics: dict[str, float] = {}
        with progress_bar(cfg.train.steps, initial=self.start_step, description="dvpo") as bar:
            for step in range(self.start_step, cfg.train.steps):
                timer = _PhaseTimer()
                # 1. the step's prompts (this rank's share)
                prompt_ids, records = self.step_prompts(step)
                # 2. rollout: sample responses from the current policy
                with timer("generation"):
                    sample = sample_rollout(self.policy, self.tokenizer, prompt_ids, self.sampling(step),
                                            old_logprobs=cfg.rollout.old_logprobs, vocab_size=self.vocab_size,
                                            micro_batch_size=cfg.rollout.forward_micro_batch_size)
                # 3. the frozen models score the rollout once: reference log-probs, GVM values
                with timer("reference_forward"), offloaded(self.reference, enabled=cfg.offload_frozen_models):
                    ref_logprobs, _ = token_logprobs(self.reference, sample.tokens, sample.response_mask,
                                                     vocab_size=self.vocab_size,
                                                     temperature=cfg.rollout.sampling.temperature,
                                                     micro_batch_size=cfg.rollout.forward_micro_batch_size)
                with timer("gvm_forward"), self.stops_cleanly_without_scorer(step):
                    gvm_values = self.scorer.values(sample.tokens, sample.sequence_lengths)
                # 4. advantages from the frozen GVM's values, normalised over the global batch
                trajectory = self.advantages(sample, ref_logprobs, gvm_values)
                metrics = self.rollout_metrics(sample, trajectory, records)
                # 5. PPO epochs of clipped policy updates over mini-batches
                with timer("update"):
                    metrics |= {f"train/{name}": value for name, value in self.update(step, trajectory).items()}
                # 6. the KL controller, metrics, a checkpoint (and a stop, if one was asked for)
                self.kl_controller.update(metrics["rollout/kl"], n_steps=cfg.rollout.prompts_per_step
                                          * cfg.rollout.samples_per_prompt)
                metrics |= timer.metrics(generated_tokens=float(self.data_parallel.sum(sample.response_mask.sum())))
                step_times.append(metrics["time/step_s"])
                self.logger.log(step + 1, metrics)
                bar.update(1)
                bar.set_postfix(gvm=f"{metrics['rollout/gvm_value_mean']:+.3f}", kl=f"{metrics['rollout/kl']:.3f}",
                                clip=f"{metrics['train/clip_fraction']:.2f}", s=f"{metrics['time/step_s']:.1f}")
                self.checkpoint_and_maybe_stop(step + 1)
        eval_after = self.evaluate("after", completed=cfg.train.steps) if cfg.eval.after else None
        return self.finish(eval_after, step_times, metrics)

    # -- its parts -----------------------------------------------------------------------------------------

    def step_prompts(self, step: int) -> tuple[list[list[int]], list[dict]]:
        """This rank's prompts of ``step`` (each repeated ``samples_per_prompt`` times) and their records."""
        per_step, repeats = self.cfg.rollout.prompts_per_step, self.cfg.rollout.samples_per_prompt
        indices = self.data_parallel.shard(self.prompt_stream.positions(step * per_step, (step + 1) * per_step))
        return ([self.train_prompts.token_ids[i] for i in indices for _ in range(repeats)],
                [self.train_prompts.records[i] for i in indices for _ in range(repeats)])

    def sampling(self, step: int) -> SamplingConfig:
        return dataclasses.replace(self.cfg.rollout.sampling,
                                   seed=derive_seed(self.cfg.train.seed, "rollout", step, self.data_parallel.rank))

    def advantages(self, sample: Sample, ref_logprobs: torch.Tensor, gvm_values: torch.Tensor) -> Trajectory:
        cfg = self.cfg
        stats = self.scorer.info.value_stats if cfg.ppo.value_normalization == "gvm" else None
        advantages = compute_advantages(
            gvm_values, sample.old_logprobs, ref_logprobs, sample.response_mask, mode=cfg.ppo.advantage_mode,
            kl_coef=self.kl_controller.value if cfg.kl_in_reward else 0.0, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            value_stats=(stats["mean"], stats["std"]) if stats else None, group=self.data_parallel.group)
        return Trajectory(sample.tokens, sample.response_mask, sample.sequence_lengths, sample.old_logprobs,
                          ref_logprobs, gvm_values, advantages.advantages)

    def update(self, step: int, trajectory: Trajectory) -> dict[str, float]:
        ppo = self.cfg.ppo
        kl_loss_coef = 0.0 if self.cfg.kl_in_reward else self.kl_controller.value

        def loss(outputs: dict[str, torch.Tensor], batch: Trajectory, global_tokens: torch.Tensor):
            result = policy_loss(outputs["logprobs"], batch.old_logprobs, batch.ref_logprobs, batch.advantages,
                                 batch.response_mask, clip=ppo.clip, kl_loss_coef=kl_loss_coef,
                                 entropy=outputs.get("entropy"), entropy_coef=ppo.entropy_coef,
                                 token_count=global_tokens)
            logged = {"pg_loss": result.pg_loss, "kl_loss": result.kl_loss, "clip_fraction": result.stats.clip_fraction,
                      "approx_kl": result.stats.approx_kl, "ratio_mean": result.stats.ratio_mean}
            if "entropy" in outputs:
                logged["entropy"] = result.entropy
            return result.loss, logged

        outputs = LogprobOutputs(self.vocab_size, self.cfg.rollout.sampling.temperature,
                                 entropy="loss" if ppo.entropy_coef > 0 else "log")
        schedule = MiniBatchSchedule(ppo.ppo_epochs, ppo.mini_batch_size, ppo.micro_batch_size)
        return minibatch_update(self.policy, self.optimizer, self.scheduler, trajectory, loss, outputs=outputs,
                                schedule=schedule, data_parallel=self.data_parallel,
                                seed=(self.cfg.train.seed, "ppo", step))

    def rollout_metrics(self, sample: Sample, trajectory: Trajectory, records: list[dict]) -> dict[str, float]:
        """Means over the global batch: token means over response tokens, sequence means over rows, and the
        verifiable score over the rollouts whose prompts carry verifiable fields."""
        from nemo_dvpo.data.verifiable import score_response

        mask = trajectory.response_mask.float()
        rows = float(mask.shape[0])
        kl = kl_estimate(trajectory.old_logprobs, trajectory.ref_logprobs, "k1") * mask
        last = (trajectory.sequence_lengths - 1).clamp(min=0)
        advantages = trajectory.advantages * mask
        sums = {
            "gvm_value_mean": (float((trajectory.values * mask).sum()), float(mask.sum())),
            "gvm_value_last_token": (float(trajectory.values.gather(1, last[:, None]).sum()), rows),
            "advantage_mean": (float(advantages.sum()), float(mask.sum())),
            "advantage_sq_mean": (float((advantages ** 2).sum()), float(mask.sum())),
            "kl": (float(kl.sum()), rows),
            "kl_per_token": (float(kl.sum()), float(mask.sum())),
            "response_length": (float(mask.sum()), rows),
        }
        if sample.entropy is not None:
            sums["entropy"] = (float((sample.entropy * mask).sum()), float(mask.sum()))
        verifiable = [score_response(record, text) for record, text in zip(records, sample.generation.response_texts)
                      if "instruction_id_list" in record]
        sums["verifiable_score"] = (float(sum(verifiable)), float(len(verifiable)))
        means = self.data_parallel.ratio({name: total for name, (total, _) in sums.items()},
                                         {name: count for name, (_, count) in sums.items()})
        tokens = float(self.data_parallel.sum(mask.sum()))
        variance = (means.pop("advantage_sq_mean") - means["advantage_mean"] ** 2) * tokens / max(tokens - 1, 1)
        means["advantage_std"] = max(variance, 0.0) ** 0.5
        means["kl_coef"] = self.kl_controller.value
        return {f"rollout/{name}": value for name, value in means.items()}

    def evaluate(self, when: str, completed: int, checkpoint=None) -> Optional[dict]:
        """The verifiable score of the policy's greedy answers; a stop signal during it stops the run."""
        if self.eval_prompts is None:
            return None
        started = time.perf_counter()
        try:
            result = evaluate_verifiable(self.policy, self.tokenizer, self.eval_prompts, self.data_parallel,
                                         batch_size=self.cfg.eval.batch_size,
                                         max_new_tokens=self.cfg.eval.max_new_tokens,
                                         should_stop=self.stop.should_stop)
        except EvaluationInterrupted:
            if when == "after":
                # Training is done: a checkpoint of the last step lets resume=true run only the evaluation.
                checkpoint = self.save_training(completed)
            raise TrainingStopped(stopped_message("dvpo", self.stop.signal_name, completed, self.cfg.train.steps,
                                                  checkpoint)) from None
        print_rank_zero(f"[dvpo] held-out verifiable score {when} training: {result['mean']:.4f} +- "
                        f"{result['ci95']:.4f} over {result['num_prompts']} prompts "
                        f"({time.perf_counter() - started:.0f} s)")
        return result

    @contextmanager
    def stops_cleanly_without_scorer(self, completed: int) -> Iterator[None]:
        """A GVM server that stays unreachable ends the run with a checkpoint after the last full step."""
        try:
            yield
        except ScorerUnavailable as error:
            saved = self.save_training(completed) if completed > 0 else None
            where = (f"with a checkpoint after step {completed} ({saved})" if saved else
                     "before its first step (nothing to save)")
            raise NemoDvpoError(f"{error}. The run stopped {where}: restart the GVM server, then run the same "
                                "command with resume=true to continue") from None

    def checkpoint_and_maybe_stop(self, completed: int) -> None:
        steps = self.cfg.train.steps
        checkpoint = None
        if completed % self.cfg.train.save_every == 0 and completed < steps:
            checkpoint = self.save_training(completed)
        # Every rank asks at the same point, so one rank's signal stops all of them after this step.
        if completed < steps and self.stop.should_stop():
            raise TrainingStopped(stopped_message("dvpo", self.stop.signal_name, completed, steps,
                                                  checkpoint or self.save_training(completed)))

    def save_training(self, step: int) -> Path:
        return save_training_checkpoint(self.cfg.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                        self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                                        trainer_state={"kl_controller": self.kl_controller.state_dict(),
                                                       "eval_before": self.eval_before},
                                        metadata={"gvm": self.gvm}, keep_last=self.cfg.train.keep_last)

    def finish(self, eval_after: Optional[dict], step_times: list[float], last_metrics: dict) -> dict:
        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final"
        save_model_checkpoint(self.policy, final, self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                              extra={"gvm": self.gvm, "step": self.cfg.train.steps})
        hf_dir = export_model_to_hf(self.policy, self.hf_config, self.tokenizer, run_dir / "hf",
                                    exported_from=str(final)) if self.cfg.export_hf else None
        summary = {
            "gvm": self.gvm,
            "verifiable_score_change": paired_change(self.eval_before, eval_after),
            "gvm_heldout_accuracy": self.scorer.info.eval_accuracy,
            "verifiable_score_before": self.eval_before,
            "verifiable_score_after": eval_after,
            "steps_this_run": len(step_times),
            "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else None,
            "final_kl": last_metrics.get("rollout/kl"),
            "final_kl_coef": self.kl_controller.value,
            "peak_memory_mib": peak_memory_mib(),
            "policy_checkpoint": str(final),
            "hf_export": str(hf_dir) if hf_dir else None,
        }
        if is_rank_zero():
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def cleanup(self) -> None:
        self.logger.close()


def _loaded(model: list[torch.nn.Module], weights: Path) -> list[torch.nn.Module]:
    load_sharded_weights(model, weights)
    return model


class _PhaseTimer:
    """Wall time of a step's phases (``time/<phase>_s``) and of the whole step."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, generated_tokens: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        return {**{f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}, "time/step_s": elapsed,
                "perf/generated_tokens_per_s": generated_tokens / self.seconds["generation"],
                "perf/peak_memory_mib": peak_memory_mib()}


# -- configuration and stage 1 ----------------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def parse_config(cfg) -> DVPORecipeConfig:
    """Typed, validated recipe config from the composed Hydra config (errors name the field)."""
    from omegaconf import OmegaConf

    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.utils.config import from_dict

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    model_cfg = load_model_config(raw.pop("model"))
    return from_dict(DVPORecipeConfig, {"model": model_cfg, **raw}, "dvpo")


def gvm_stage_config(cfg, dvpo_cfg: DVPORecipeConfig):
    """Stage-1 config: the GVM recipe's defaults and conf/gvm.yaml, the policy's model and layout,
    run_dir/gvm, then ``gvm_training``."""
    from omegaconf import OmegaConf

    from nemo_dvpo.recipes.gvm import GVMRecipeConfig, parse_config as parse_gvm_config
    from nemo_dvpo.utils.config import defaults_of

    overrides = OmegaConf.load(CONF_DIR / "gvm.yaml")
    for key in ("defaults", "hydra"):
        overrides.pop(key, None)
    base = OmegaConf.merge(OmegaConf.create(defaults_of(GVMRecipeConfig)), overrides)
    base.model = cfg.model
    base.parallel = cfg.parallel
    base.run_dir = str(Path(dvpo_cfg.run_dir) / "gvm")
    base.resume = dvpo_cfg.resume
    base.overwrite = dvpo_cfg.overwrite
    merged = OmegaConf.merge(base, OmegaConf.create(dvpo_cfg.gvm_training))
    return parse_gvm_config(merged)


def train_gvm_first(cfg, dvpo_cfg: DVPORecipeConfig, stop: Optional[GracefulStop] = None) -> str:
    """Stage 1 when no GVM is configured: train one into ``run_dir/gvm`` (or reuse a finished one)."""
    import gc

    from nemo_dvpo.recipes.gvm import GVMRecipe

    gvm_cfg = gvm_stage_config(cfg, dvpo_cfg)
    final = Path(gvm_cfg.run_dir) / "final"
    if (final / "nemo_dvpo_checkpoint.json").exists() and not dvpo_cfg.overwrite:
        print_rank_zero(f"[dvpo] gvm=null: using the GVM already trained by this run at {final}")
        return str(final)
    print_rank_zero(f"[dvpo] gvm=null: no GVM configured, so stage 1 trains one first into {gvm_cfg.run_dir} "
                    f"({gvm_cfg.train.steps} steps on {gvm_cfg.data.train}); pass gvm=PATH to reuse a GVM")
    recipe = GVMRecipe(gvm_cfg, stop=stop)
    recipe.train()
    recipe.logger.close()
    del recipe
    gc.collect()
    return str(final)


def _number(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_summary(summary: dict) -> str:
    def score(result: Optional[dict]) -> str:
        if not result:
            return "not evaluated"
        return (f"{result['mean']:.4f} +- {result['ci95']:.4f} (95% CI, {result['num_prompts']} prompts; "
                f"all instructions followed: {result['all_followed']:.1%})")

    accuracy = summary["gvm_heldout_accuracy"]
    change = summary["verifiable_score_change"]
    step_s = summary["median_step_s"]
    lines = [
        "DVPO summary",
        f"  GVM                        {summary['gvm']}",
        "  GVM held-out accuracy      " + (f"mean-token {accuracy['mean']:.3f}, last-token {accuracy['last']:.3f}"
                                            if accuracy else "not recorded in the GVM checkpoint"),
        f"  verifiable score before    {score(summary['verifiable_score_before'])}",
        f"  verifiable score after     {score(summary['verifiable_score_after'])}",
        "  change (paired)            " + (f"{change['mean']:+.4f} +- {change['ci95']:.4f} (95% CI)" if change
                                            else "not evaluated"),
        f"  final KL (sequence, k1)    {_number(summary['final_kl'])}   "
        f"KL coefficient {summary['final_kl_coef']:.4f}",
        "  time per step (median)     " + (f"{step_s:.1f} s over {summary['steps_this_run']} steps" if step_s
                                            else "no step ran"),
        f"  peak memory                {summary['peak_memory_mib']:.0f} MiB",
        f"  policy checkpoint          {summary['policy_checkpoint']}",
        f"  Hugging Face export        {summary['hf_export']}",
    ]
    return "\n".join(lines)
