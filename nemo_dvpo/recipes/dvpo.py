"""Stage 2 of DVPO: optimise the policy with PPO against a frozen Global Value Model.

Three models are loaded: the policy (the only one with gradients and optimizer state), a frozen
reference (KL anchor) and the frozen GVM (advantages). No reward model, no critic. Per step:

    1. the step's prompts (a function of the step, so a resumed run sees the same data);
    2. rollout: sample responses from the current policy (megatron-core generation, KV cache);
    3. forward passes only: old log-probs (policy), reference log-probs, GVM values - once per rollout;
    4. advantages from the GVM values (``nemo_dvpo.algorithms.dvpo.compute_advantages``);
    5. ``ppo_epochs`` passes of clipped policy updates over shuffled mini-batches, gradient
       accumulation over micro-batches (``policy_loss``);
    6. KL-controller update, metrics, a periodic atomic checkpoint.

Before the first step and after the last, the policy's greedy answers to held-out verifiable prompts
are scored with the IFEval checkers; the final policy is saved and exported as a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.dvpo import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    kl_estimate,
    masked_mean,
    policy_loss,
)
from nemo_dvpo.checkpointing.model_checkpoint import (
    load_hf_config_from_checkpoint,
    read_checkpoint_metadata,
    read_checkpoint_model_config,
    save_model_checkpoint,
)
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import load_training_checkpoint, save_training_checkpoint
from nemo_dvpo.data.prompts import PromptSet, load_prompts
from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config, unwrap_model
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.conversion import export_model_to_hf
from nemo_dvpo.models.forward import forward_only, logits_for_positions, position_ids_for
from nemo_dvpo.models.logprobs import at_token_positions, predictive_entropies, response_logit_span, target_logprobs
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.models.value_model import build_value_model, token_values
from nemo_dvpo.training.metrics import MetricsLogger, peak_memory_mib, progress_bar
from nemo_dvpo.training.offload import move_parameters, offload_enabled, offloaded
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils.distributed import (
    ParallelConfig,
    all_reduce_on_device,
    compute_device,
    initialize_distributed,
    print_rank_zero,
    standalone_model_groups,
    validate_parallel_layout,
)
from nemo_dvpo.utils.errors import CheckpointError, ConfigError, TrainingStopped


@dataclass
class PromptDataConfig:
    # RL prompts: JSONL records with "prompt" (verifiable fields make rollouts scorable).
    train: str = "data/smollm2_ifeval/prompts.jsonl"
    train_split: Optional[str] = "train"
    # Held-out verifiable prompts whose greedy answers are scored before and after training.
    eval: Optional[str] = "data/smollm2_ifeval/prompts_heldout.jsonl"
    eval_split: Optional[str] = None
    max_prompt_tokens: int = 192
    chat_template: bool = True


@dataclass
class RolloutConfig:
    # Prompts per step over all data-parallel ranks, and responses drawn per prompt.
    prompts_per_step: int = 8
    samples_per_prompt: int = 1
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
    ppo_epochs: int = 4
    # Sequences per optimizer step over all data-parallel ranks, and per forward/backward on a rank.
    mini_batch_size: int = 2
    micro_batch_size: int = 2
    clip: float = 0.2
    # "value": the paper's batch-normalised GVM value; "gae": the authors' code (KL rewards + GAE).
    advantage_mode: Literal["value", "gae"] = "value"
    gamma: float = 1.0
    lam: float = 0.95
    # Normalise GVM values by the batch ("batch") or by the statistics stored with the GVM ("gvm").
    value_normalization: Literal["batch", "gvm"] = "batch"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "mini_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.clip <= 0:
            raise ConfigError(f"ppo.clip must be > 0, got {self.clip}")


@dataclass
class KLConfig:
    controller: Literal["adaptive", "fixed"] = "adaptive"
    init_coef: float = 0.2
    # Adaptive: the sequence-level KL (sum over response tokens, mean over sequences) steered to.
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
    num_prompts: int = 64
    batch_size: int = 32
    max_new_tokens: int = 160
    before: bool = True
    after: bool = True


@dataclass
class DVPOTrainConfig:
    steps: int = 16
    seed: int = 1234
    save_every: int = 8
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.save_every < 1:
            raise ConfigError("train.steps and train.save_every must be >= 1")


@dataclass
class DVPORecipeConfig:
    model: ModelConfig
    run_dir: str = "runs/dvpo"
    resume: bool = False
    resume_from: Optional[str] = None
    overwrite: bool = False
    # A trained GVM checkpoint (kind "gvm"); null trains one first with stage 1 (see ``gvm_training``).
    gvm: Optional[str] = None
    # Stage-1 overrides (conf/gvm.yaml keys) for the GVM trained when ``gvm`` is null.
    gvm_training: dict = field(default_factory=dict)
    # Tensor-parallel size of the GVM: null runs it at the policy's layout (TP and PP); a number runs it
    # on its own process groups at that TP size without pipeline parallelism (it must divide the world size).
    gvm_tensor_model_parallel_size: Optional[int] = None
    # A nemo_dvpo checkpoint to start the policy (and reference) from; null takes model.source.
    init_from: Optional[str] = None
    # Keep the frozen reference and GVM in CPU memory except during their forward passes (GPU).
    offload_frozen_models: bool = False
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

    @property
    def kl_in_reward(self) -> bool:
        return self.kl.placement == "reward" or (self.kl.placement == "auto" and self.ppo.advantage_mode == "gae")


@dataclass
class Rollout:
    """One step's sampled sequences on this data-parallel rank, with everything the update needs."""

    tokens: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    gvm_values: torch.Tensor
    advantages: torch.Tensor
    # Prompt + response length of each row (the rest is padding).
    sequence_lengths: torch.Tensor
    records: list[dict]
    response_texts: list[str]


def confidence_interval_95(scores: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    count = len(scores)
    mean = sum(scores) / count
    if count < 2:
        return mean, float("nan")
    variance = sum((score - mean) ** 2 for score in scores) / (count - 1)
    return mean, 1.96 * math.sqrt(variance / count)


class _Interrupted(Exception):
    """A stop signal arrived during an evaluation (raised on every rank at the same batch)."""


def freeze(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    for module in model:
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return model


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class DVPORecipe:
    """Wires config -> policy, reference, GVM, prompts, optimizer; ``train()`` runs the numbered loop."""

    def __init__(self, cfg: DVPORecipeConfig, gvm_path: str, stop: Optional[GracefulStop] = None):
        from megatron.core import parallel_state

        self.cfg = cfg
        self.stop = stop or GracefulStop()
        model_cfg = cfg.model
        initialize_distributed(cfg.parallel, num_attention_heads=model_cfg.num_attention_heads,
                               num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
        checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                     resume_from=cfg.resume_from)
        self.gvm_groups = self._gvm_process_groups(gvm_path)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group() if self.dp_size > 1 else None
        rollout, ppo = cfg.rollout, cfg.ppo
        sequences = rollout.prompts_per_step * rollout.samples_per_prompt
        if rollout.prompts_per_step % self.dp_size:
            raise ConfigError(f"rollout.prompts_per_step={rollout.prompts_per_step} must be a multiple of the "
                              f"data-parallel size {self.dp_size}")
        if sequences % ppo.mini_batch_size or ppo.mini_batch_size % self.dp_size or \
                (ppo.mini_batch_size // self.dp_size) % ppo.micro_batch_size:
            raise ConfigError(
                f"ppo.mini_batch_size={ppo.mini_batch_size} must divide the {sequences} sequences of a step "
                f"(rollout.prompts_per_step x rollout.samples_per_prompt) and split into data-parallel size "
                f"{self.dp_size} x micro-batches of ppo.micro_batch_size={ppo.micro_batch_size}")
        self.prompts_per_rank = rollout.prompts_per_step // self.dp_size
        self._epoch_order: tuple[int, list[int]] = (-1, [])

        # Data.
        self.tokenizer = load_tokenizer(model_cfg.tokenizer_source if cfg.init_from is None
                                        else read_checkpoint_model_config(cfg.init_from).tokenizer_source)
        self.vocab_size = len(self.tokenizer)
        data = cfg.data
        self.train_prompts = load_prompts(data.train, self.tokenizer, data.max_prompt_tokens, split=data.train_split,
                                          chat_template=data.chat_template)
        print_rank_zero(f"[dvpo] {len(self.train_prompts)} training prompts from {data.train}"
                        + (f" (skipped {self.train_prompts.skipped})" if self.train_prompts.skipped else ""))
        self.eval_prompts: Optional[PromptSet] = None
        if data.eval and (cfg.eval.before or cfg.eval.after):
            self.eval_prompts = load_prompts(data.eval, self.tokenizer, data.max_prompt_tokens, split=data.eval_split,
                                             chat_template=data.chat_template, limit=cfg.eval.num_prompts)
        seq_length = data.max_prompt_tokens + max(rollout.sampling.max_new_tokens, cfg.eval.max_new_tokens)

        # Models: the policy trains; reference and GVM are frozen and never wrapped for gradients.
        if cfg.init_from is None:
            self.hf_config = resolve_hf_config(model_cfg)
            build_kwargs = {}
        else:
            self.hf_config = load_hf_config_from_checkpoint(cfg.init_from)
            build_kwargs = {"hf_config": self.hf_config, "load_weights": False,
                            "transform": self._load_init_checkpoint}
            model_cfg = dataclasses.replace(read_checkpoint_model_config(cfg.init_from),
                                            precision=cfg.model.precision)
        self.policy_cfg = model_cfg
        if checkpoint is not None:
            check_resumed_model(checkpoint, model_cfg)
        self.policy = build_gpt_model(model_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(cfg.optim),
                                      seq_length=seq_length, **build_kwargs)
        # The reference is the starting policy: a copy of its weights, not a second load (random-init
        # presets would otherwise differ, and a reload costs time).
        self.reference = freeze(build_gpt_model(model_cfg, hf_config=self.hf_config, load_weights=False,
                                                seq_length=seq_length))
        unwrap_model(self.reference[0]).load_state_dict(unwrap_model(self.policy[0]).state_dict())
        self.gvm_path = gvm_path
        self.gvm_metadata = self._check_gvm(gvm_path)
        self.gvm = freeze(build_value_model(model_cfg, init_from=gvm_path, seq_length=seq_length,
                                            pg_collection=self.gvm_groups))
        if offload_enabled(cfg.offload_frozen_models):
            move_parameters(self.reference, "cpu")
            move_parameters(self.gvm, "cpu")
        self._log_entropy = True

        updates_per_step = ppo.ppo_epochs * (sequences // ppo.mini_batch_size)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim, cfg.train.steps * updates_per_step)
        configure_for_training(self.policy, self.optimizer)
        self.kl_controller = (AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
                              if cfg.kl.controller == "adaptive" else FixedKLController(cfg.kl.init_coef))

        self.start_step = 0
        self.eval_before: Optional[dict] = None
        self.resumed_from = checkpoint
        if cfg.resume and checkpoint is None:
            print_rank_zero(f"[dvpo] resume=true but {cfg.run_dir} has no checkpoint yet: starting fresh")
        if checkpoint is not None:
            state = load_training_checkpoint(checkpoint, self.policy, self.optimizer, self.scheduler)
            self.start_step = state["step"]
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.eval_before = state.get("eval_before")
            print_rank_zero(f"[dvpo] resumed from {checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(cfg.run_dir, resume_step=self.start_step if checkpoint else None)

    def _load_init_checkpoint(self, model):
        from nemo_dvpo.checkpointing.model_checkpoint import load_sharded_weights

        load_sharded_weights(model, Path(self.cfg.init_from) / "weights")
        return model

    def _gvm_process_groups(self, path: str):
        """The GVM's own process groups when it runs at its own TP size, else None (policy layout)."""
        size = self.cfg.gvm_tensor_model_parallel_size
        if size is None:
            return None
        gvm_cfg = read_checkpoint_model_config(path)
        try:
            validate_parallel_layout(dist.get_world_size(), ParallelConfig(size, 1),
                                     num_attention_heads=gvm_cfg.num_attention_heads,
                                     num_query_groups=gvm_cfg.num_query_groups)
        except ConfigError as error:
            raise ConfigError(f"gvm_tensor_model_parallel_size={size}: {error}") from None
        print_rank_zero(f"[dvpo] the GVM runs at its own layout: tensor-parallel {size}, data-parallel "
                        f"{dist.get_world_size() // size}, no pipeline parallelism")
        return standalone_model_groups(size)

    def _check_gvm(self, path: str) -> dict:
        metadata = read_checkpoint_metadata(path)
        if metadata["kind"] != "gvm":
            raise CheckpointError(f"gvm={path} holds a {metadata['kind']!r} checkpoint, not a GVM (kind 'gvm')")
        gvm_cfg = read_checkpoint_model_config(path)
        if gvm_cfg.vocab_size != self.policy_cfg.vocab_size:
            raise CheckpointError(f"the GVM at {path} has vocabulary size {gvm_cfg.vocab_size}, the policy "
                                  f"{self.policy_cfg.vocab_size}: GVM and policy must share the tokenizer")
        gvm_info = metadata.get("gvm") or {}
        if bool(gvm_info.get("chat_template", True)) != self.cfg.data.chat_template:
            raise ConfigError(f"data.chat_template={self.cfg.data.chat_template} but the GVM at {path} was trained "
                              f"with chat_template={gvm_info.get('chat_template')}: they must see the same tokens")
        if self.cfg.ppo.value_normalization == "gvm" and not gvm_info.get("value_stats"):
            raise CheckpointError(f"ppo.value_normalization=gvm but the GVM at {path} stores no value statistics")
        return metadata

    # -- 1. data --------------------------------------------------------------------------------------

    def step_prompt_indices(self, step: int) -> list[int]:
        """This rank's prompts for ``step``: slice ``[step * P, (step + 1) * P)`` of seeded epoch permutations."""
        count, per_step = len(self.train_prompts), self.cfg.rollout.prompts_per_step
        indices = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, count)
            if self._epoch_order[0] != epoch:
                self._epoch_order = (epoch, torch.randperm(count, generator=torch.Generator().manual_seed(
                    _seed_for(self.cfg.train.seed, "epoch", epoch))).tolist())
            indices.append(self._epoch_order[1][offset])
        return indices[self.dp_rank * self.prompts_per_rank:(self.dp_rank + 1) * self.prompts_per_rank]

    # -- 2.-4. rollout, scoring and advantages ----------------------------------------------------------

    def _policy_logprobs_and_entropy(self, tokens: torch.Tensor,
                                     response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temperature = self.cfg.rollout.sampling.temperature
        start, end = response_logit_span(response_mask)

        def reduce(logits, micro_tokens):
            entropy = predictive_entropies(logits, self.vocab_size, temperature)  # before the in-place log-probs
            logprobs = target_logprobs(logits, micro_tokens[:, start + 1:], self.vocab_size, temperature,
                                       overwrite_logits=True)
            return torch.stack([at_token_positions(logprobs, start), at_token_positions(entropy, start)], dim=-1)

        both = forward_only(self.policy, tokens, reduce, (*tokens.shape, 2),
                            micro_batch_size=self.cfg.rollout.forward_micro_batch_size, logit_span=(start, end))
        return both[..., 0], both[..., 1]

    def _reference_logprobs(self, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        temperature = self.cfg.rollout.sampling.temperature
        start, end = response_logit_span(response_mask)

        def reduce(logits, micro_tokens):
            return at_token_positions(target_logprobs(logits, micro_tokens[:, start + 1:], self.vocab_size,
                                                      temperature, overwrite_logits=True), start)

        return forward_only(self.reference, tokens, reduce, tuple(tokens.shape),
                            micro_batch_size=self.cfg.rollout.forward_micro_batch_size, logit_span=(start, end))

    def make_rollout(self, step: int, timings: dict, metrics: dict) -> Rollout:
        cfg = self.cfg
        indices = self.step_prompt_indices(step)
        repeats = cfg.rollout.samples_per_prompt
        prompt_ids = [self.train_prompts.token_ids[i] for i in indices for _ in range(repeats)]
        records = [self.train_prompts.records[i] for i in indices for _ in range(repeats)]

        started = time.perf_counter()
        sampling = dataclasses.replace(cfg.rollout.sampling,
                                       seed=_seed_for(cfg.train.seed, "rollout", step, self.dp_rank))
        output = generate(self.policy, self.tokenizer, prompt_ids, sampling)
        timings["generation"] = time.perf_counter() - started
        tokens, response_mask = output.tokens, output.response_mask

        if cfg.rollout.old_logprobs == "recompute":
            started = time.perf_counter()
            old_logprobs, entropy = self._policy_logprobs_and_entropy(tokens, response_mask)
            timings["policy_forward"] = time.perf_counter() - started
            metrics["rollout/entropy"] = float(masked_mean(entropy, response_mask))
        else:
            # The sampler's log-softmax of the same logits (KV-cache path; equal to a full forward
            # pass within float rounding), so PPO's first ratio is 1 without another forward pass.
            old_logprobs = output.logprobs
        started = time.perf_counter()
        with offloaded(self.reference, enabled=cfg.offload_frozen_models):
            ref_logprobs = self._reference_logprobs(tokens, response_mask)
        timings["reference_forward"] = time.perf_counter() - started
        started = time.perf_counter()
        with offloaded(self.gvm, enabled=cfg.offload_frozen_models):
            gvm_values = token_values(self.gvm, tokens, micro_batch_size=cfg.rollout.forward_micro_batch_size,
                                      pg_collection=self.gvm_groups)
        timings["gvm_forward"] = time.perf_counter() - started

        kl_coef = self.kl_controller.value
        value_stats = None
        if cfg.ppo.value_normalization == "gvm":
            stats = self.gvm_metadata["gvm"]["value_stats"]
            value_stats = (stats["mean"], stats["std"])
        advantages = compute_advantages(
            gvm_values, old_logprobs, ref_logprobs, response_mask, mode=cfg.ppo.advantage_mode,
            kl_coef=kl_coef if cfg.kl_in_reward else 0.0, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            value_stats=value_stats, group=self.dp_group)

        mask = response_mask
        rows = torch.arange(tokens.shape[0])
        last_index = (output.prompt_lengths + output.response_lengths - 1)
        sequence_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(dim=1)
        metrics.update({
            "rollout/gvm_value_mean": float(masked_mean(gvm_values, mask)),
            "rollout/gvm_value_last_token": float(gvm_values[rows, last_index].mean()),
            "rollout/advantage_mean": float(masked_mean(advantages.advantages, mask)),
            "rollout/advantage_std": float(advantages.advantages[mask].std()) if int(mask.sum()) > 1 else 0.0,
            "rollout/kl": float(sequence_kl.mean()),
            "rollout/kl_per_token": float(masked_mean(kl_estimate(old_logprobs, ref_logprobs, "k1"), mask)),
            "rollout/response_length": float(output.response_lengths.float().mean()),
            "rollout/kl_coef": kl_coef,
        })
        verifiable = [record for record in records if "instruction_id_list" in record]
        if len(verifiable) == len(records):
            from nemo_dvpo.data.verifiable import score_response

            metrics["rollout/verifiable_score"] = sum(
                score_response(record, text) for record, text in zip(records, output.response_texts)) / len(records)
        if self.dp_group is not None:
            # Every rank holds as many sequences, so the mean of the ranks' means is the global mean;
            # the KL controller in particular must see the same KL on every rank.
            names = sorted(name for name in metrics if name.startswith("rollout/"))
            values = torch.tensor([metrics[name] for name in names], dtype=torch.float64)
            values = all_reduce_on_device(values, group=self.dp_group)
            metrics.update(zip(names, (values / self.dp_size).tolist()))
        return Rollout(tokens, response_mask, old_logprobs, ref_logprobs, gvm_values, advantages.advantages,
                       output.prompt_lengths + output.response_lengths, records, output.response_texts)

    # -- 5. policy update -------------------------------------------------------------------------------

    def _forward_step(self, micro_batch: dict, chunk):
        ppo, temperature = self.cfg.ppo, self.cfg.rollout.sampling.temperature
        micro_batch = {name: value.to(compute_device()) for name, value in micro_batch.items()}
        tokens, response_mask = micro_batch["tokens"], micro_batch["response_mask"]
        # Logits only where they predict response tokens; prompt positions need none.
        start, end = response_logit_span(response_mask)
        with logits_for_positions(chunk, start, end):
            output = chunk(tokens, position_ids_for(tokens), attention_mask=None)

        def loss_func(logits: torch.Tensor):
            entropy = None
            # Before the log-probs: megatron's cross entropy then reuses the logits' memory in place.
            if ppo.entropy_coef > 0:
                entropy = at_token_positions(predictive_entropies(logits, self.vocab_size, temperature), start)
            elif self._log_entropy:
                with torch.no_grad():  # for the logs only, so only in the first PPO epoch
                    entropy = at_token_positions(
                        predictive_entropies(logits.detach(), self.vocab_size, temperature), start)
            logprobs = at_token_positions(target_logprobs(logits, tokens[:, start + 1:], self.vocab_size, temperature,
                                                          overwrite_logits=True), start)
            result = policy_loss(logprobs, micro_batch["old_logprobs"], micro_batch["ref_logprobs"],
                                 micro_batch["advantages"], response_mask, clip=ppo.clip,
                                 kl_loss_coef=0.0 if self.cfg.kl_in_reward else self.kl_controller.value,
                                 entropy=entropy, entropy_coef=ppo.entropy_coef)
            # A token mean over the whole mini-batch (all micro-batches and data-parallel ranks): the
            # schedule divides by the number of micro-batches and DDP averages over ranks.
            loss = result.loss * micro_batch["token_weight"]
            logged = {"pg_loss": result.pg_loss, "kl_loss": result.kl_loss, "clip_fraction": result.stats.clip_fraction,
                      "approx_kl": result.stats.approx_kl, "ratio_mean": result.stats.ratio_mean}
            if entropy is not None:
                logged["entropy"] = result.entropy
            return loss, logged

        return output, loss_func

    def update_policy(self, step: int, rollout: Rollout) -> dict[str, float]:
        from megatron.core import parallel_state

        ppo = self.cfg.ppo
        local_sequences = rollout.tokens.shape[0]
        mini_per_rank = ppo.mini_batch_size // self.dp_size
        num_micro = mini_per_rank // ppo.micro_batch_size
        collected: list[dict[str, float]] = []
        seq_length = rollout.tokens.shape[1]
        pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        for epoch in range(ppo.ppo_epochs):
            self._log_entropy = epoch == 0
            order = torch.randperm(local_sequences, generator=torch.Generator().manual_seed(
                _seed_for(self.cfg.train.seed, "ppo", step, epoch, self.dp_rank)))
            for start in range(0, local_sequences, mini_per_rank):
                mini = order[start:start + mini_per_rank]
                tokens_in_mini = rollout.response_mask[mini].sum().float()
                if self.dp_group is not None:
                    tokens_in_mini = all_reduce_on_device(tokens_in_mini, group=self.dp_group)
                micro_batches = []
                for micro_start in range(0, mini_per_rank, ppo.micro_batch_size):
                    rows = mini[micro_start:micro_start + ppo.micro_batch_size]
                    # Without pipeline stages nothing needs a fixed shape: drop the trailing padding
                    # shared by these rows (causal attention makes it invisible to earlier tokens).
                    length = seq_length if pipelined else int(rollout.sequence_lengths[rows].max())
                    micro_tokens = rollout.response_mask[rows].sum().float()
                    micro_batches.append({
                        name: getattr(rollout, name)[rows, :length]
                        for name in ("tokens", "response_mask", "old_logprobs", "ref_logprobs", "advantages")
                    } | {"token_weight": micro_tokens * num_micro * self.dp_size / tokens_in_mini})
                collected.append(train_step(self.policy, self.optimizer, self.scheduler, micro_batches,
                                            self._forward_step, seq_length=seq_length,
                                            micro_batch_size=ppo.micro_batch_size))
        names = sorted({name for metrics in collected for name in metrics})
        return {f"train/{name}": sum(m[name] for m in collected if name in m) / sum(name in m for m in collected)
                for name in names}

    # -- evaluation --------------------------------------------------------------------------------------

    def evaluate_verifiable(self) -> Optional[dict]:
        """Greedy answers to the held-out prompts, scored with the IFEval checkers (strict).

        Raises :class:`_Interrupted` when a stop signal arrives (checked between batches on every rank).
        """
        if self.eval_prompts is None:
            return None
        from nemo_dvpo.data.verifiable import score_response

        cfg = self.cfg.eval
        prompts = self.eval_prompts
        mine = list(range(self.dp_rank, len(prompts), self.dp_size))
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=True)
        scores: dict[int, float] = {}
        # The same number of batches on every rank (the last may be empty), so the stop check lines up.
        per_rank = math.ceil(len(prompts) / self.dp_size)
        for start in range(0, per_rank, cfg.batch_size):
            batch = mine[start:start + cfg.batch_size]
            if batch:
                output = generate(self.policy, self.tokenizer, [prompts.token_ids[i] for i in batch], sampling)
                for index, text in zip(batch, output.response_texts):
                    scores[index] = score_response(prompts.records[index], text)
            if self.stop.should_stop():
                raise _Interrupted()
        if self.dp_group is not None:
            gathered: list = [None] * self.dp_size
            dist.all_gather_object(gathered, scores, group=self.dp_group)
            scores = {k: v for part in gathered for k, v in part.items()}
        ordered = [scores[i] for i in sorted(scores)]
        mean, half_width = confidence_interval_95(ordered)
        return {"mean": mean, "ci95": half_width, "num_prompts": len(ordered),
                "all_followed": sum(score == 1.0 for score in ordered) / len(ordered),
                "prompt_ids": [prompts.records[i].get("prompt_id", i) for i in sorted(scores)], "scores": ordered}

    # -- the loop ---------------------------------------------------------------------------------------

    def train(self) -> dict:
        with self.stop:
            return self._train()

    def _stopped(self, completed: int, checkpoint) -> TrainingStopped:
        return TrainingStopped(stopped_message("dvpo", self.stop.signal_name, completed, self.cfg.train.steps,
                                               checkpoint))

    def _train(self) -> dict:
        cfg = self.cfg
        if self.eval_before is None and cfg.eval.before:
            started = time.perf_counter()
            try:
                self.eval_before = self.evaluate_verifiable()
            except _Interrupted:
                raise self._stopped(self.start_step, self.resumed_from) from None
            if self.eval_before:
                print_rank_zero(f"[dvpo] held-out verifiable score before training: {self.eval_before['mean']:.4f} "
                                f"+- {self.eval_before['ci95']:.4f} over {self.eval_before['num_prompts']} prompts "
                                f"({time.perf_counter() - started:.0f} s)")
        step_times: list[float] = []
        last_metrics: dict[str, float] = {}
        with progress_bar(cfg.train.steps, initial=self.start_step, description="dvpo") as bar:
            for step in range(self.start_step, cfg.train.steps):
                started = time.perf_counter()
                timings: dict[str, float] = {}
                metrics: dict[str, float] = {}
                rollout = self.make_rollout(step, timings, metrics)                       # steps 1-4
                update_started = time.perf_counter()
                metrics.update(self.update_policy(step, rollout))                           # step 5
                timings["update"] = time.perf_counter() - update_started
                sequences = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
                self.kl_controller.update(metrics["rollout/kl"], n_steps=sequences)          # step 6
                elapsed = time.perf_counter() - started
                step_times.append(elapsed)
                generated = float(rollout.response_mask.sum()) * self.dp_size
                metrics.update({f"time/{phase}_s": seconds for phase, seconds in timings.items()})
                metrics.update({"time/step_s": elapsed,
                                "perf/generated_tokens_per_s": generated / timings["generation"],
                                "perf/peak_memory_mib": peak_memory_mib()})
                completed = step + 1
                self.logger.log(completed, metrics)
                last_metrics = metrics
                bar.update(1)
                bar.set_postfix(gvm=f"{metrics['rollout/gvm_value_mean']:+.3f}", kl=f"{metrics['rollout/kl']:.3f}",
                                clip=f"{metrics['train/clip_fraction']:.2f}", s=f"{elapsed:.1f}")
                checkpoint = None
                if completed % cfg.train.save_every == 0 and completed < cfg.train.steps:
                    checkpoint = self.save_training(completed)
                # Every rank asks at the same point, so one rank's signal stops all of them after this step.
                if completed < cfg.train.steps and self.stop.should_stop():
                    raise self._stopped(completed, checkpoint or self.save_training(completed))
        try:
            eval_after = self.evaluate_verifiable() if cfg.eval.after else None
        except _Interrupted:
            # Training is done: a checkpoint at the last step lets resume=true run only the evaluation.
            raise self._stopped(cfg.train.steps, self.save_training(cfg.train.steps)) from None
        return self.finish(eval_after, step_times, last_metrics)

    def save_training(self, step: int) -> Path:
        return save_training_checkpoint(self.cfg.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                 self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                                 trainer_state={"kl_controller": self.kl_controller.state_dict(),
                                                "eval_before": self.eval_before},
                                 metadata={"gvm": self.gvm_path}, keep_last=self.cfg.train.keep_last)

    def finish(self, eval_after: Optional[dict], step_times: list[float], last_metrics: dict) -> dict:
        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final"
        save_model_checkpoint(self.policy, final, self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                              extra={"gvm": self.gvm_path, "step": self.cfg.train.steps})
        hf_dir = None
        if self.cfg.export_hf:
            hf_dir = export_model_to_hf(self.policy, self.hf_config, self.tokenizer, run_dir / "hf")
        improvement = None
        if self.eval_before and eval_after and self.eval_before["prompt_ids"] == eval_after["prompt_ids"]:
            # Same prompts before and after: the paired difference has a much tighter interval.
            mean, half_width = confidence_interval_95(
                [after - before for before, after in zip(self.eval_before["scores"], eval_after["scores"])])
            improvement = {"mean": mean, "ci95": half_width, "num_prompts": len(eval_after["scores"])}
        summary = {
            "gvm": self.gvm_path,
            "verifiable_score_change": improvement,
            "gvm_heldout_accuracy": (self.gvm_metadata.get("gvm") or {}).get("eval_accuracy"),
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
        if dist.get_rank() == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def cleanup(self) -> None:
        self.logger.close()


# -- configuration and stage 1 ------------------------------------------------------------------------

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
    """Stage-1 config: conf/gvm.yaml, the policy's model and layout, run_dir/gvm, then ``gvm_training``."""
    from omegaconf import OmegaConf

    from nemo_dvpo.recipes.gvm import parse_config as parse_gvm_config

    base = OmegaConf.load(CONF_DIR / "gvm.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
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


def format_summary(summary: dict) -> str:
    def score(result: Optional[dict]) -> str:
        if not result:
            return "not evaluated"
        return (f"{result['mean']:.4f} +- {result['ci95']:.4f} (95% CI, {result['num_prompts']} prompts; "
                f"all instructions followed: {result['all_followed']:.1%})")

    accuracy = summary["gvm_heldout_accuracy"]
    change = summary["verifiable_score_change"]
    lines = [
        "DVPO summary",
        f"  GVM                        {summary['gvm']}",
        "  GVM held-out accuracy      " + (f"mean-token {accuracy['mean']:.3f}, last-token {accuracy['last']:.3f}"
                                            if accuracy else "not recorded in the GVM checkpoint"),
        f"  verifiable score before    {score(summary['verifiable_score_before'])}",
        f"  verifiable score after     {score(summary['verifiable_score_after'])}",
        "  change (paired)            " + (f"{change['mean']:+.4f} +- {change['ci95']:.4f} (95% CI)" if change
                                            else "not evaluated"),
        f"  final KL (sequence, k1)    {summary['final_kl']}   KL coefficient {summary['final_kl_coef']:.4f}",
        f"  time per step (median)     {summary['median_step_s']} s over {summary['steps_this_run']} steps",
        f"  peak memory                {summary['peak_memory_mib']:.0f} MiB",
        f"  policy checkpoint          {summary['policy_checkpoint']}",
        f"  Hugging Face export        {summary['hf_export']}",
    ]
    return "\n".join(lines)
