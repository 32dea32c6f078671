"""PPO with a reward model and a trained critic (Ouyang et al. 2022), built from the same parts as DVPO.

Four models take part: the policy and the critic train (each with its own optimizer and schedule); the
reference and the reward model are frozen. The critic starts from the reward model (or from a GVM, or any
value-model checkpoint), as in InstructGPT. Per step, ``PPORecipe.train()``:

    1. the step's prompts;  2. rollout;  3. reference log-probs, reward-model scores and the critic's values,
    once per rollout;  4. rewards (the batch-whitened score at the last token, the KL per token) and GAE
    advantages and returns;  5. critic epochs on the clipped value loss, then (after the critic's warm-up
    steps) policy epochs on PPO's clipped surrogate;  6. the KL controller, metrics (explained variance
    included).

The equations, the critic's and the policy's loss (:func:`~nemo_dvpo.algorithms.ppo.policy_loss`), are
:mod:`nemo_dvpo.algorithms.ppo`. Policy and critic are checkpointed together and resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from nemo_dvpo.algorithms.ppo import (explained_variance, gae, normalize_scores, ppo_rewards, state_values,
                                      value_loss)
from nemo_dvpo.checkpointing.model_checkpoint import (load_hf_config_from_checkpoint, load_value_model,
                                                     read_checkpoint_model_config)
from nemo_dvpo.checkpointing.train_checkpoint import TrainedModel
from nemo_dvpo.models.value_model import token_values
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.rlhf.config import PolicyRunConfig, PolicyUpdateConfig
from nemo_dvpo.rlhf.metrics import rollout_metrics
from nemo_dvpo.rlhf.parts import RLParts
from nemo_dvpo.rlhf.scorers import RewardScorer, frozen_value_model
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.rlhf.update import MiniBatchSchedule, ValueOutputs, minibatch_update
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.run import Run
from nemo_dvpo.training.step import configure_for_training
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class PPOUpdateConfig(PolicyUpdateConfig):
    # GAE's discount.
    gamma: float = 1.0
    # GAE's lambda.
    lam: float = 0.95
    # The reward model's scores enter the rewards whitened over the rollout's sequences ("batch", as OpenRLHF's
    # and NeMo-Aligner's reward normalisation) or raw ("none"). A Bradley-Terry model's scale is arbitrary:
    # SmolLM2-135M's after one epoch spreads its scores by a few hundredths, which the KL penalty outweighs.
    score_normalization: Literal["batch", "none"] = "batch"


@dataclass
class CriticConfig:
    # The critic's starting weights: a value-model checkpoint (reward model or GVM); null: the reward model.
    init_from: Optional[str] = None
    # Its own optimizer and schedule.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=0, decay_style="constant"))
    # PPO's value clip around the rollout's values (null: the plain squared error).
    value_clip: Optional[float] = 0.2
    # Steps at the start in which only the critic trains (the policy waits for useful advantages).
    warmup_steps: int = 0
    # Passes over each rollout for the critic (mini- and micro-batch sizes are the policy's).
    epochs: int = 4

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.epochs < 1:
            raise ConfigError("critic.warmup_steps must be >= 0 and critic.epochs >= 1")


@dataclass
class PPORecipeConfig(PolicyRunConfig):
    run_dir: str = "runs/ppo"
    # The frozen reward model (examples/train_reward_model.py's final/).
    reward_model: str = ""
    critic: CriticConfig = field(default_factory=CriticConfig)
    ppo: PPOUpdateConfig = field(default_factory=PPOUpdateConfig)

    def __post_init__(self) -> None:
        if not self.reward_model:
            raise ConfigError("reward_model=PATH is required: a trained reward model (examples/train_reward_model.py)")
        if self.kl.placement == "loss":
            raise ConfigError("PPO pays the KL in its rewards (kl.placement=auto or reward)")


class PPORecipe:
    """``__init__`` wires config -> run, reward model, policy parts, critic; ``train()`` is the algorithm."""

    def __init__(self, cfg: PPORecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.run = run = Run(cfg, "ppo", stop)
        self.reward_model = RewardScorer(frozen_value_model(cfg.reward_model, ("reward_model",), cfg, run.model_cfg,
                                                            run.tokenizer))
        self.parts = parts = RLParts.build(cfg, run)
        mini_batches = cfg.rollout.sequences_per_step // cfg.ppo.mini_batch_size
        self.critic = self.build_critic(cfg.critic.init_from or cfg.reward_model, cfg.critic.epochs * mini_batches)
        run.track(parts.policy.trained, state=parts.state, extra_models={"critic": self.critic})
        parts.restore(run.resume())

    def build_critic(self, init_from: str, updates_per_step: int) -> TrainedModel:
        cfg, run = self.cfg, self.run
        model_cfg = read_checkpoint_model_config(init_from, run_as=run.model_cfg)
        if model_cfg.vocab_size != run.model_cfg.vocab_size:
            raise ConfigError(f"critic.init_from={init_from} has vocabulary size {model_cfg.vocab_size}, the policy "
                              f"{run.model_cfg.vocab_size}")
        model = load_value_model(model_cfg, init_from=init_from, wrap_with_ddp=True,
                                  ddp_config=ddp_config_for(cfg.critic.optim), seq_length=cfg.seq_length)
        optimizer, scheduler = build_optimizer(model, cfg.critic.optim, cfg.train.steps * updates_per_step)
        configure_for_training(model, optimizer)
        return TrainedModel(model, optimizer, scheduler, model_cfg, load_hf_config_from_checkpoint(init_from),
                            kind="critic")

    # -- the algorithm -------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, run, parts = self.cfg, self.run, self.parts
        policy = parts.policy
        with run.stopping():
            parts.evaluation.score_before(policy.model)
            for step in run.steps(show=("rollout/score", "rollout/kl", "train/critic_explained_variance")):
                timer = run.phase_timer()
                # 1. the step's prompts (this rank's share)
                prompt_ids, records = parts.prompts.step_prompts(step)
                # 2. rollout: sample responses from the current policy
                with timer("generation"):
                    sample = policy.sample(run.tokenizer, prompt_ids, parts.prompts.sampling(step))
                # 3. one pass each over the rollout: reference log-probs, reward-model scores, critic values
                with timer("reference_forward"):
                    ref_logprobs = policy.reference_logprobs(sample)
                with timer("reward_forward"):
                    scores = self.reward_model.scores(sample.tokens, sample.sequence_lengths)
                with timer("critic_forward"):
                    values = state_values(token_values(self.critic.model, sample.tokens,
                                                       micro_batch_size=cfg.rollout.forward_micro_batch_size))
                # 4. rewards (the score, whitened over the batch, at the end; the KL per token) and GAE over
                #    the critic's state values
                reward_scores = (normalize_scores(scores, group=run.data_parallel.group)
                                 if cfg.ppo.score_normalization == "batch" else scores)
                rewards = ppo_rewards(reward_scores, sample.old_logprobs, ref_logprobs, sample.response_mask,
                                      parts.kl.value)
                advantages = gae(rewards, values, sample.response_mask, cfg.ppo.gamma, cfg.ppo.lam,
                                 group=run.data_parallel.group)
                trajectory = Trajectory(sample.tokens, sample.response_mask, sample.sequence_lengths,
                                        sample.old_logprobs, ref_logprobs, values * sample.response_mask,
                                        advantages.advantages, advantages.returns)
                metrics = rollout_metrics(sample, trajectory, records, "critic_value", run.data_parallel,
                                          parts.kl.value)
                metrics["rollout/score"] = float(run.data_parallel.mean({"s": float(scores.mean())})["s"])
                over_budget = parts.kl_budget.watch(step, metrics["rollout/kl"])
                # 5. critic epochs, then policy epochs once the critic has warmed up
                with timer("critic_update"):
                    metrics |= self.update_critic(step, trajectory)
                if step >= cfg.critic.warmup_steps:
                    with timer("update"):
                        metrics |= policy.update(step, trajectory, cfg.ppo, kl_loss_coef=0.0)
                # 6. the KL controller; metrics (a checkpoint, or a stop, follows the step)
                parts.kl.update(metrics["rollout/kl"], n_steps=cfg.rollout.sequences_per_step)
                run.log(step, metrics | timer.metrics(run.data_parallel.sum(sample.response_mask.sum())))
                # 7. past train.kl_budget: back to the newest policy within it, and end the run
                if over_budget:
                    run.end_after_this_step(parts.kl_budget.return_to_within())
            return parts.finish(run, {"reward_model": cfg.reward_model,
                                      "critic_init": cfg.critic.init_from or cfg.reward_model},
                                metadata={"reward_model": cfg.reward_model})

    def update_critic(self, step: int, trajectory: Trajectory) -> dict[str, float]:
        cfg, critic = self.cfg, self.critic

        def loss(outputs: dict[str, torch.Tensor], batch: Trajectory, global_tokens: torch.Tensor):
            values = state_values(outputs["values"])
            value = value_loss(values, batch.values, batch.returns, batch.response_mask, cfg.critic.value_clip,
                               token_count=global_tokens)
            with torch.no_grad():
                logged = {"critic_loss": value_loss(values, batch.values, batch.returns, batch.response_mask,
                                                    cfg.critic.value_clip),
                          "critic_explained_variance": torch.tensor(explained_variance(
                              values.detach(), batch.returns, batch.response_mask))}
            return value, logged

        schedule = MiniBatchSchedule(cfg.critic.epochs, cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size)
        metrics = minibatch_update(critic.model, critic.optimizer, critic.scheduler, trajectory, loss,
                                   outputs=ValueOutputs(), schedule=schedule, data_parallel=self.run.data_parallel,
                                   seed=(cfg.train.seed, "critic", step))
        return {f"train/{name}" if name.startswith("critic") else f"train/critic_{name}": value
                for name, value in metrics.items()}

    def cleanup(self) -> None:
        self.parts.policy.close()
        self.run.cleanup()


def parse_config(cfg) -> PPORecipeConfig:
    return parse_recipe_config(cfg, PPORecipeConfig, "ppo")
