"""Stage 2 of DVPO: optimise the policy with PPO against a frozen Global Value Model.

Three models take part: the policy (the only one with gradients and optimizer state), a frozen reference
(the KL anchor) and the frozen GVM, in this process or served (:mod:`nemo_dvpo.rlhf.scorers`). No reward
model, no critic. ``DVPORecipe.train()`` is the algorithm, one numbered step per line of the paper's box;
the run's lifecycle (checkpoints, resume, stops, the final save) is :class:`~nemo_dvpo.training.run.Run`, the
policy, prompts, KL controller and evaluation are :class:`~nemo_dvpo.rlhf.parts.RLParts`, and the objective is
pure functions (:mod:`nemo_dvpo.algorithms.dvpo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from nemo_dvpo.algorithms.dvpo import compute_advantages
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.rlhf.config import PolicyRunConfig, PolicyUpdateConfig
from nemo_dvpo.rlhf.metrics import rollout_metrics
from nemo_dvpo.rlhf.parts import RLParts
from nemo_dvpo.rlhf.rollout import Sample
from nemo_dvpo.rlhf.scorers import ValueScorer, check_scorer_matches_policy, frozen_value_model, stop_on_outage
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.serving.gvm_client import GVMClientConfig, RemoteGVM, is_url
from nemo_dvpo.training.metrics import peak_memory_mib, reset_peak_memory
from nemo_dvpo.training.run import Run
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.distributed import model_parallel_group, print_rank_zero
from nemo_dvpo.utils.errors import ConfigError
from nemo_dvpo.utils.paths import CONF_DIR


@dataclass
class DVPOUpdateConfig(PolicyUpdateConfig):
    # "value": the paper's batch-normalised GVM value; "gae": the authors' code (KL rewards + GAE).
    advantage_mode: Literal["value", "gae"] = "value"
    # GAE's discount (mode "gae").
    gamma: float = 1.0
    # GAE's lambda (mode "gae").
    lam: float = 0.95
    # Normalise GVM values by the batch ("batch") or by the statistics stored with the GVM ("gvm").
    value_normalization: Literal["batch", "gvm"] = "batch"


@dataclass
class DVPORecipeConfig(PolicyRunConfig):
    run_dir: str = "runs/dvpo"
    # A trained GVM checkpoint (kind "gvm"), or the URL(s) of GVM servers (examples/serve_gvm.py,
    # comma-separated replicas); null trains one first with stage 1 (see ``gvm_training``).
    gvm: Optional[str] = None
    # Stage-1 overrides (nemo_dvpo/conf/gvm.yaml keys) for the GVM trained when ``gvm`` is null.
    gvm_training: dict = field(default_factory=dict)
    # Tensor-parallel size of an in-process GVM: null runs it at the policy's layout (TP and PP); a number
    # runs it on its own process groups at that TP size without pipeline parallelism (dividing the world).
    gvm_tensor_model_parallel_size: Optional[int] = None
    # How to talk to a served GVM (gvm=http://host:port[,http://host2:port]): timeouts, retries, token.
    gvm_client: GVMClientConfig = field(default_factory=GVMClientConfig)
    ppo: DVPOUpdateConfig = field(default_factory=DVPOUpdateConfig)

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


class DVPORecipe:
    """``__init__`` wires config -> run, GVM, policy parts; ``train()`` is the algorithm; ``cleanup`` closes logs."""

    def __init__(self, cfg: DVPORecipeConfig, gvm: str, stop: Optional[GracefulStop] = None):
        self.cfg, self.gvm = cfg, gvm
        self.run = run = Run(cfg, "dvpo", stop)
        # The frozen GVM first: one that does not fit the policy fails before the policy is built.
        if is_url(gvm):
            self.scorer: ValueScorer = RemoteGVM(gvm, cfg.gvm_client, group=model_parallel_group())
            check_scorer_matches_policy(self.scorer.info, run.tokenizer, run.model_cfg.vocab_size,
                                        cfg.data.chat_template, where=gvm)
        else:
            self.scorer = frozen_value_model(gvm, ("gvm",), cfg, run.model_cfg, run.tokenizer,
                                             tensor_parallel=cfg.gvm_tensor_model_parallel_size)
        if cfg.ppo.value_normalization == "gvm" and not self.scorer.info.value_stats:
            raise ConfigError(f"ppo.value_normalization=gvm but the GVM at {gvm} stores no value statistics")
        self.parts = parts = RLParts.build(cfg, run)
        run.track(parts.policy.trained, state=parts.state)
        parts.restore(run.resume())

    # -- the algorithm -------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, run, parts = self.cfg, self.run, self.parts
        policy = parts.policy
        with run.stopping():
            parts.evaluation.score_before(policy.model)
            for step in run.steps(show=("rollout/gvm_value_mean", "rollout/kl", "train/clip_fraction")):
                timer = run.phase_timer()
                # 1. the step's prompts (this rank's share)
                prompt_ids, records = parts.prompts.step_prompts(step)
                # 2. rollout: sample responses from the current policy
                with timer("generation"):
                    sample = policy.sample(run.tokenizer, prompt_ids, parts.prompts.sampling(step))
                # 3. the frozen models score the rollout once: reference log-probs, GVM values
                with timer("reference_forward"):
                    ref_logprobs = policy.reference_logprobs(sample)
                with timer("gvm_forward"), stop_on_outage(run.save, step):
                    gvm_values = self.scorer.values(sample.tokens, sample.sequence_lengths)
                # 4. advantages from the frozen GVM's values, normalised over the global batch
                trajectory = self.advantages(sample, ref_logprobs, gvm_values)
                metrics = rollout_metrics(sample, trajectory, records, "gvm_value", run.data_parallel, parts.kl.value)
                over_budget = parts.kl_budget.watch(step, metrics["rollout/kl"])
                # 5. PPO epochs of clipped policy updates over mini-batches
                with timer("update"):
                    metrics |= policy.update(step, trajectory, cfg.ppo,
                                             kl_loss_coef=0.0 if cfg.kl_in_reward else parts.kl.value)
                # 6. the KL controller; metrics (a checkpoint, or a stop, follows the step)
                parts.kl.update(metrics["rollout/kl"], n_steps=cfg.rollout.sequences_per_step)
                run.log(step, metrics | timer.metrics(run.data_parallel.sum(sample.response_mask.sum())))
                # 7. past train.kl_budget: back to the newest policy within it, and end the run
                if over_budget:
                    run.end_after_this_step(parts.kl_budget.return_to_within())
            return parts.finish(run, {"gvm": self.gvm, "gvm_heldout_accuracy": self.scorer.info.eval_accuracy},
                                metadata={"gvm": self.gvm})

    # -- its parts -----------------------------------------------------------------------------------------

    def advantages(self, sample: Sample, ref_logprobs: torch.Tensor, gvm_values: torch.Tensor) -> Trajectory:
        cfg, parts = self.cfg, self.parts
        stats = self.scorer.info.value_stats if cfg.ppo.value_normalization == "gvm" else None
        advantages = compute_advantages(
            gvm_values, sample.old_logprobs, ref_logprobs, sample.response_mask, mode=cfg.ppo.advantage_mode,
            kl_coef=parts.kl.value if cfg.kl_in_reward else 0.0, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            value_stats=(stats["mean"], stats["std"]) if stats else None, group=self.run.data_parallel.group)
        return Trajectory(sample.tokens, sample.response_mask, sample.sequence_lengths, sample.old_logprobs,
                          ref_logprobs, gvm_values, advantages.advantages)

    def cleanup(self) -> None:
        self.parts.policy.close()
        self.run.cleanup()


# -- configuration and stage 1 ----------------------------------------------------------------------------

def parse_config(cfg) -> DVPORecipeConfig:
    """Typed, validated recipe config from the composed Hydra config (errors name the field)."""
    return parse_recipe_config(cfg, DVPORecipeConfig, "dvpo")


def gvm_stage_config(cfg, dvpo_cfg: DVPORecipeConfig):
    """Stage-1 config: the GVM recipe's defaults and nemo_dvpo/conf/gvm.yaml, the policy's model and layout,
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
    recipe.cleanup()
    del recipe
    gc.collect()
    # Stage 1's peak is in its own metrics (run_dir/gvm); stage 2 reports its own from here.
    print_rank_zero(f"[dvpo] stage 1 done: peak memory {peak_memory_mib():.0f} MiB")
    reset_peak_memory()
    return str(final)
