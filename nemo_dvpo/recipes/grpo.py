"""GRPO (Shao et al. 2024): several responses per prompt, advantages relative to the prompt's group, no critic.

Three models take part: the policy (trains), a frozen reference and a frozen reward model. Per step,
``GRPORecipe.train()``:

    1. the step's prompts, each ``rollout.samples_per_prompt`` times;  2. rollout;  3. reference log-probs
    and reward-model scores, once per rollout;  4. each response's score standardised within its prompt's
    group, at every one of its tokens;  5. PPO epochs of the clipped surrogate with the KL as a loss term
    (``beta * k3``);  6. the KL controller, metrics.

The advantages are :mod:`nemo_dvpo.algorithms.grpo`; the loss :func:`~nemo_dvpo.algorithms.ppo.policy_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_dvpo.algorithms.grpo import group_advantages, token_advantages
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.rlhf.config import PolicyRunConfig, RolloutConfig
from nemo_dvpo.rlhf.metrics import rollout_metrics
from nemo_dvpo.rlhf.parts import RLParts
from nemo_dvpo.rlhf.scorers import RewardScorer, frozen_value_model
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.training.run import Run
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class GRPORecipeConfig(PolicyRunConfig):
    run_dir: str = "runs/grpo"
    # The frozen reward model (examples/train_reward_model.py's final/).
    reward_model: str = ""
    # Groups of 4 responses per prompt.
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(samples_per_prompt=4))

    def __post_init__(self) -> None:
        if not self.reward_model:
            raise ConfigError("reward_model=PATH is required: a trained reward model (examples/train_reward_model.py)")
        if self.rollout.samples_per_prompt < 2:
            raise ConfigError("GRPO compares responses to the same prompt: rollout.samples_per_prompt must be >= 2")
        if self.kl.placement == "reward":
            raise ConfigError("GRPO pays the KL as a loss term (kl.placement=auto or loss)")


class GRPORecipe:
    """``__init__`` wires config -> run, reward model, policy parts; ``train()`` is the algorithm."""

    def __init__(self, cfg: GRPORecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.run = run = Run(cfg, "grpo", stop)
        self.reward_model = RewardScorer(frozen_value_model(cfg.reward_model, ("reward_model",), cfg, run.model_cfg,
                                                            run.tokenizer))
        self.parts = parts = RLParts.build(cfg, run)
        run.track(parts.policy.trained, state=parts.state)
        parts.restore(run.resume())

    def train(self) -> dict:
        cfg, run, parts = self.cfg, self.run, self.parts
        policy = parts.policy
        with run.stopping():
            parts.evaluation.score_before(policy.model)
            for step in run.steps(show=("rollout/score", "rollout/kl", "train/clip_fraction")):
                timer = run.phase_timer()
                # 1. the step's prompts, each repeated for its group
                prompt_ids, records = parts.prompts.step_prompts(step)
                # 2. rollout: a group of responses per prompt from the current policy
                with timer("generation"):
                    sample = policy.sample(run.tokenizer, prompt_ids, parts.prompts.sampling(step))
                # 3. once over the rollout: reference log-probs, reward-model scores
                with timer("reference_forward"):
                    ref_logprobs = policy.reference_logprobs(sample)
                with timer("reward_forward"):
                    scores = self.reward_model.scores(sample.tokens, sample.sequence_lengths)
                # 4. group-relative advantages, at every token of each response
                advantages = token_advantages(group_advantages(scores, cfg.rollout.samples_per_prompt),
                                              sample.response_mask)
                trajectory = Trajectory(sample.tokens, sample.response_mask, sample.sequence_lengths,
                                        sample.old_logprobs, ref_logprobs, scores[:, None] * sample.response_mask,
                                        advantages)
                metrics = rollout_metrics(sample, trajectory, records, "score", run.data_parallel, parts.kl.value)
                metrics["rollout/score"] = metrics.pop("rollout/score_last_token")
                metrics.pop("rollout/score_mean")
                over_budget = parts.kl_budget.watch(step, metrics["rollout/kl"])
                # 5. PPO epochs of the clipped surrogate, the KL to the reference as a loss term
                with timer("update"):
                    metrics |= policy.update(step, trajectory, cfg.ppo, kl_loss_coef=parts.kl.value)
                # 6. the KL controller; metrics (a checkpoint, or a stop, follows the step)
                parts.kl.update(metrics["rollout/kl"], n_steps=cfg.rollout.sequences_per_step)
                run.log(step, metrics | timer.metrics(run.data_parallel.sum(sample.response_mask.sum())))
                # 7. past train.kl_budget: back to the newest policy within it, and end the run
                if over_budget:
                    run.end_after_this_step(parts.kl_budget.return_to_within())
            return parts.finish(run, {"reward_model": cfg.reward_model}, metadata={"reward_model": cfg.reward_model})

    def cleanup(self) -> None:
        self.parts.policy.close()
        self.run.cleanup()


def parse_config(cfg) -> GRPORecipeConfig:
    return parse_recipe_config(cfg, GRPORecipeConfig, "grpo")
