"""Settings every on-policy RL recipe shares (DVPO, PPO, GRPO): prompts, rollout, the PPO-style update, the KL
to the reference, evaluation, the step schedule, and where the run lives. Each field's default is here and
only here; a recipe's config extends :class:`PolicyRunConfig` with what is its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.inference.vllm_engine import VllmEngineConfig
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.lora import LoRAConfig
from nemo_dvpo.training.optim import OptimConfig
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class PromptDataConfig:
    # RL prompts: JSONL records with "prompt" (verifiable fields make the rollouts' scores loggable).
    train: str = "data/smollm2_ifeval/prompts.jsonl"
    # Keep only records whose "split" field is this (null: every record).
    train_split: Optional[str] = "train"
    # Held-out verifiable prompts whose greedy answers are scored before and after training (null: none).
    eval: Optional[str] = "data/smollm2_ifeval/prompts_heldout.jsonl"
    # Keep only held-out records whose "split" field is this (null: every record).
    eval_split: Optional[str] = None
    # Longer prompts (after the chat template) are skipped and counted.
    max_prompt_tokens: int = 192
    # Prompts go through the tokenizer's chat template (a GVM or reward model must have seen the same).
    chat_template: bool = True


@dataclass
class RolloutConfig:
    # Prompts per step over all data-parallel ranks.
    prompts_per_step: int = 8
    # Responses drawn per prompt (GRPO's group size).
    samples_per_prompt: int = 1
    # How responses are drawn (temperature, top-k / top-p, max_new_tokens, EOS).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0))
    # Sequences per forward pass of a value model scoring a rollout (GVM values, reward-model scores, critic values).
    # A GVM server's counterpart is its server.rows: equal settings give bit-identical values.
    forward_micro_batch_size: int = 8
    # Sequences per log-prob pass over a rollout (reference, recomputed old log-probs). null: the update's
    # micro-batch (ppo.micro_batch_size). Such a pass projects every response position onto the vocabulary, and the
    # update's pass with gradients already holds that many rows' logits: a larger one makes the allocator grow the
    # heap for blocks no other phase uses (docs/benchmarks.md, "Peak memory: the log-prob passes' micro-batch").
    logprob_micro_batch_size: Optional[int] = None
    # PPO's old log-probs: "generation" takes those the sampler computed (free; exact when no top-k /
    # top-p filter reshapes the sampling distribution), "recompute" runs a policy forward pass.
    old_logprobs: Literal["generation", "recompute"] = "generation"
    # What draws the responses: "megatron" (the policy itself, megatron-core's static batch) or "vllm" (a vLLM
    # engine in its own process and environment - ./setup.sh --with-vllm - refitted with the policy's weights
    # before each rollout that follows an update; rollout.vllm says how it starts and refits).
    engine: Literal["megatron", "vllm"] = "megatron"
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.samples_per_prompt < 1 or self.forward_micro_batch_size < 1:
            raise ConfigError("rollout.prompts_per_step, rollout.samples_per_prompt and "
                              "rollout.forward_micro_batch_size must be >= 1")
        if self.logprob_micro_batch_size is not None and self.logprob_micro_batch_size < 1:
            raise ConfigError(f"rollout.logprob_micro_batch_size must be >= 1 or null (the update's micro-batch), "
                              f"got {self.logprob_micro_batch_size}")
        if self.old_logprobs == "generation" and (self.sampling.top_k != 0 or self.sampling.top_p != 1.0):
            raise ConfigError("rollout.old_logprobs=generation needs rollout.sampling.top_k=0 and top_p=1: with a "
                              "filter the sampler's log-probs are not the policy's; set rollout.old_logprobs=recompute")
        if self.engine == "vllm" and self.old_logprobs != "recompute":
            raise ConfigError("rollout.engine=vllm needs rollout.old_logprobs=recompute: PPO's ratio starts from the "
                              "Megatron policy's own log-probs of the engine's samples (the engine's kernels are not "
                              "the policy's; their gap is logged as rollout/engine_token_mult_prob_error)")
        if self.sampling.is_greedy:
            raise ConfigError("rollout.sampling must sample (temperature > 0, greedy=false): PPO needs "
                              "log-probs of a stochastic policy")

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class PolicyUpdateConfig:
    # Passes over each step's rollout.
    ppo_epochs: int = 4
    # Sequences per optimizer step over all data-parallel ranks.
    mini_batch_size: int = 2
    # Sequences per forward/backward pass on a rank (gradients accumulate over a mini-batch's micro-batches).
    micro_batch_size: int = 2
    # PPO's ratio clip epsilon.
    clip: float = 0.2
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
    # The KL coefficient beta at the start (throughout, with the fixed controller).
    init_coef: float = 0.2
    # Adaptive: the sequence-level KL (sum over response tokens, mean over sequences) steered to.
    target: float = 6.0
    # Adaptive: the number of sequences over which the coefficient adapts (a step moves beta by at most
    # 20% x sequences / horizon).
    horizon: int = 10000
    # "reward": -beta * (logp - ref_logp) per token in the reward stream; "loss": beta * k3 added to the
    # policy loss; "auto": the algorithm's own (DVPO's mode "value" and GRPO: loss; PPO and DVPO "gae": reward).
    placement: Literal["auto", "reward", "loss"] = "auto"

    def __post_init__(self) -> None:
        if self.init_coef < 0:
            raise ConfigError(f"kl.init_coef must be >= 0, got {self.init_coef}")


@dataclass
class EvalConfig:
    # Held-out prompts scored (the first N of data.eval).
    num_prompts: int = 64
    # Prompts per greedy generation batch.
    batch_size: int = 32
    # The longest greedy answer in tokens.
    max_new_tokens: int = 160
    # Score the starting policy before training.
    before: bool = True
    # Score the final policy after training.
    after: bool = True


@dataclass
class PolicyTrainConfig:
    # Policy-optimisation steps (one rollout each).
    steps: int = 16
    # Seeds the prompt order, the sampling and the model's initialisation.
    seed: int = 1234
    # Checkpoint every N steps (and at the end).
    save_every: int = 8
    # Checkpoints kept: the newest N.
    keep_last: int = 2
    # A KL budget against over-optimising the scorer: when the policy's sequence KL to the reference
    # (rollout/kl: k1 summed over a response, mean over the batch) passes it, the run stops and the final
    # policy is the last one measured within it (its trained weights kept in host memory, one copy per
    # model-parallel shard). null: no budget.
    kl_budget: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.save_every < 1:
            raise ConfigError("train.steps and train.save_every must be >= 1")
        if self.kl_budget is not None and not self.kl_budget > 0:
            raise ConfigError(f"train.kl_budget must be > 0 (a sequence KL in nats) or null, got {self.kl_budget!r}")


@dataclass
class PolicyRunConfig:
    # The model: a preset (model=<name>, nemo_dvpo/conf/model/) whose fields model.<field>=... override.
    model: ModelConfig
    # Checkpoints, final/ (policy), hf/ (export), summary.json, metrics.jsonl, tensorboard/ go here.
    run_dir: str = "runs/policy"
    # Continue from run_dir/checkpoints/latest (same prompts, weights, optimizer and schedule state).
    resume: bool = False
    # Continue from this checkpoint instead (e.g. when the latest is damaged).
    resume_from: Optional[str] = None
    # Start over in a run_dir that already holds a run, removing only that run's own files.
    overwrite: bool = False
    # A nemo_dvpo checkpoint to start the policy (and reference) from; null takes model.source.
    init_from: Optional[str] = None
    # Keep frozen models (reference, GVM, reward model) in CPU memory except during their forward passes (GPU).
    offload_frozen_models: bool = False
    # Export the final policy as a Hugging Face folder (run_dir/hf).
    export_hf: bool = True
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)
    # The policy's clipped-surrogate updates (a recipe may extend them: DVPO's advantage mode, PPO's GAE).
    ppo: PolicyUpdateConfig = field(default_factory=PolicyUpdateConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, decay_style="constant"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # LoRA adapters on the policy (lora.enabled=true): only they train; the reference is the policy with them off.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @property
    def seq_length(self) -> int:
        """The longest sequence the models see: a prompt and the longer of a rollout's and an evaluation's answer."""
        return self.data.max_prompt_tokens + max(self.rollout.sampling.max_new_tokens, self.eval.max_new_tokens)

    @property
    def logprob_micro_batch_size(self) -> int:
        """Sequences per log-prob pass over a rollout: ``rollout.logprob_micro_batch_size``, else the update's."""
        return self.rollout.logprob_micro_batch_size or self.ppo.micro_batch_size

    @property
    def updates_per_step(self) -> int:
        """The policy's optimizer steps per RL step (they size its learning-rate schedule)."""
        return self.ppo.ppo_epochs * (self.rollout.sequences_per_step // self.ppo.mini_batch_size)
