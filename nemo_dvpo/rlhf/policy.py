"""The policy side of a run: the trained policy (Megatron DDP, optimizer, schedule) and its frozen reference.

:class:`PolicyModels` samples a rollout, computes the reference's log-probs of it and runs PPO's clipped
updates over it (:func:`~nemo_dvpo.algorithms.ppo.policy_loss`); DPO uses the same builder and reference.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.ppo import AdaptiveKLController, FixedKLController, policy_loss
from nemo_dvpo.checkpointing.model_checkpoint import load_hf_config_from_checkpoint, load_sharded_weights
from nemo_dvpo.checkpointing.train_checkpoint import TrainedModel
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.inference.vllm_engine import VllmEngine, logprob_gap_metrics, refit_from_policy
from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config, unwrap_model
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.lora import LoRAConfig, adapters_disabled, has_adapters, merge_adapters
from nemo_dvpo.models.sources import hf_folder_for
from nemo_dvpo.rlhf.config import KLConfig, PolicyUpdateConfig, RolloutConfig
from nemo_dvpo.rlhf.rollout import Sample, sample_rollout, token_logprobs
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.rlhf.update import LogprobOutputs, MiniBatchSchedule, minibatch_update
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.offload import move_parameters, offload_enabled, offloaded
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training
from nemo_dvpo.utils.distributed import model_parallel_group
from nemo_dvpo.utils.errors import ConfigError


def freeze(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    for module in model:
        module.eval()
        module.requires_grad_(False)
    return model


def build_policy_and_reference(policy_cfg: ModelConfig, init_from: Optional[str], optim: OptimConfig, seq_length: int,
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


def check_update_layout(update: PolicyUpdateConfig, rollout: RolloutConfig, data_parallel_size: int) -> None:
    """A step's prompts split over data-parallel ranks; mini-batches divide its sequences and split into
    data-parallel ranks x micro-batches."""
    dp, sequences = data_parallel_size, rollout.sequences_per_step
    if rollout.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step={rollout.prompts_per_step} must be a multiple of the "
                          f"data-parallel size {dp}")
    if sequences % update.mini_batch_size or update.mini_batch_size % dp or \
            (update.mini_batch_size // dp) % update.micro_batch_size:
        raise ConfigError(
            f"ppo.mini_batch_size={update.mini_batch_size} must divide the {sequences} sequences of a step "
            f"(rollout.prompts_per_step x rollout.samples_per_prompt) and split into data-parallel size "
            f"{dp} x micro-batches of ppo.micro_batch_size={update.micro_batch_size}")


def kl_controller(kl: KLConfig):
    """The KL coefficient's controller: adaptive (Ziegler et al.) or fixed."""
    return AdaptiveKLController(kl.init_coef, kl.target, kl.horizon) if kl.controller == "adaptive" else \
        FixedKLController(kl.init_coef)


class PolicyModels:
    """The policy that trains and its frozen reference (the KL anchor), for an on-policy RL recipe.

    ``updates_per_step``: optimizer steps per RL step (sizes the learning-rate schedule).
    """

    def __init__(self, cfg, policy_cfg: ModelConfig, vocab_size: int, seq_length: int, updates_per_step: int,
                 data_parallel: DataParallel):
        self.cfg, self.policy_cfg, self.vocab_size = cfg, policy_cfg, vocab_size
        self.data_parallel = data_parallel
        # One engine per data-parallel rank (it samples that rank's prompts); checked on every rank, before the
        # models are built.
        settings = cfg.rollout.vllm.for_data_parallel_rank(data_parallel.rank, data_parallel.size)
        self.model, self.reference, self.hf_config = build_policy_and_reference(
            policy_cfg, cfg.init_from, cfg.optim, seq_length, offload_reference=cfg.offload_frozen_models,
            lora=cfg.lora)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps * updates_per_step)
        configure_for_training(self.model, self.optimizer)
        # rollout.engine=vllm: the engine of this model-parallel group, on its first rank (None elsewhere). Its
        # weights are stale until refitted: at the start (it serves dummy weights, and a resume restores the
        # policy after this) and after every update.
        self.engine: Optional[VllmEngine] = None
        self.engine_is_stale = True
        if cfg.rollout.engine == "vllm" and _first_of_model_parallel_group():
            self.engine = VllmEngine(dataclasses.replace(
                settings, model=settings.model or hf_folder_of(policy_cfg, cfg.init_from),
                max_model_len=max(settings.max_model_len, seq_length), seed=cfg.train.seed)).start()

    @property
    def trained(self) -> TrainedModel:
        """What a checkpoint saves of the policy."""
        return TrainedModel(self.model, self.optimizer, self.scheduler, self.policy_cfg, self.hf_config, "policy")

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the updates change: every weight, or with LoRA the adapters only (the base never moves)."""
        return [param for module in self.model for param in unwrap_model(module).parameters() if param.requires_grad]

    def sample(self, tokenizer, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Sample:
        """One response per prompt from the current policy: drawn by the policy itself, or by the vLLM engine
        (refitted first if an update changed the policy since) and scored by the policy - PPO's old log-probs
        are always the policy's own."""
        rollout = self.cfg.rollout
        if rollout.engine == "megatron":
            return sample_rollout(self.model, tokenizer, prompt_ids, sampling, old_logprobs=rollout.old_logprobs,
                                  vocab_size=self.vocab_size, micro_batch_size=self.cfg.logprob_micro_batch_size)
        metrics = {}
        engine, vllm = self.engine, rollout.vllm
        if self.engine_is_stale:
            started = time.perf_counter()
            if engine is not None:
                engine.wake_up(["weights"])  # a no-op unless the engine sleeps between rollouts (sleep mode)
            refit_from_policy(engine, self.model, self.hf_config)  # collective over the model-parallel group
            metrics["time/refit_s"] = time.perf_counter() - started
            self.engine_is_stale = False
        generation = None
        if engine is not None:
            engine.wake_up()
            generation = engine.generate_output(tokenizer, prompt_ids, sampling)
            if vllm.enable_sleep_mode:
                engine.sleep()
        if vllm.enable_sleep_mode and vllm.sleep_level == 2:
            self.engine_is_stale = True  # its weights were dropped: refitted before the next rollout (every rank)
        generation = _from_first_of_model_parallel_group(generation)
        logprobs, entropy = token_logprobs(self.model, generation.tokens, generation.response_mask,
                                           vocab_size=self.vocab_size, temperature=sampling.temperature,
                                           micro_batch_size=self.cfg.logprob_micro_batch_size, with_entropy=True)
        # How far the engine's log-probs of its own samples are from the policy's (NeMo-RL's token_mult_prob_error:
        # 1.0 is exact agreement; a stale or wrong refit shows here first). Comparable as such without top-k / top-p
        # filters: the engine reports the filtered distribution's log-probs, the policy the temperature-scaled one.
        gap = logprob_gap_metrics(generation.logprobs, logprobs, generation.response_mask)
        metrics |= {f"rollout/engine_{name}": value for name, value in gap.items()}
        return Sample(generation, logprobs, entropy, metrics)

    def reference_logprobs(self, sample: Sample) -> torch.Tensor:
        rollout = self.cfg.rollout
        with offloaded(self.reference or [], enabled=self.cfg.offload_frozen_models), \
                reference_model(self.reference, self.model) as reference:
            logprobs, _ = token_logprobs(reference, sample.tokens, sample.response_mask,
                                         vocab_size=self.vocab_size, temperature=rollout.sampling.temperature,
                                         micro_batch_size=self.cfg.logprob_micro_batch_size)
        return logprobs

    def update(self, step: int, trajectory: Trajectory, update: PolicyUpdateConfig,
               kl_loss_coef: float) -> dict[str, float]:
        """PPO's clipped surrogate (plus ``kl_loss_coef * k3`` and the entropy bonus) over ``update.ppo_epochs``
        passes of mini-batches of the trajectory; returns the averaged metrics, named ``train/*``."""

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
        metrics = minibatch_update(self.model, self.optimizer, self.scheduler, trajectory, loss, outputs=outputs,
                                   schedule=schedule, data_parallel=self.data_parallel,
                                   seed=(self.cfg.train.seed, "ppo", step))
        self.engine_is_stale = True
        return {f"train/{name}": value for name, value in metrics.items()}

    def finalize(self) -> list[torch.nn.Module]:
        """The policy for the final checkpoint and export (adapters merged)."""
        self.model = finalize_policy(self.model)
        return self.model

    def close(self) -> None:
        """Stop the rollout engine's process (it also dies with this one, however this one ends)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def hf_folder_of(policy_cfg: ModelConfig, init_from: Optional[str]) -> str:
    """A Hugging Face folder with the policy's architecture config (a rollout engine's shape): the ``init_from``
    checkpoint's ``hf/``, else the preset's source as a folder."""
    if init_from is not None:
        return str(Path(init_from) / "hf")
    return hf_folder_for(policy_cfg.source).location


def _first_of_model_parallel_group() -> bool:
    group = model_parallel_group()
    return group is None or dist.get_rank(group) == 0


def _from_first_of_model_parallel_group(value):
    """``value`` of the model-parallel group's first rank, on every rank of the group."""
    group = model_parallel_group()
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]

