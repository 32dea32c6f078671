"""The parts every on-policy RL recipe (DVPO, PPO, GRPO) holds besides its algorithm and its scorers.

    run = Run(cfg, "dvpo", stop)
    parts = RLParts.build(cfg, run)                   # prompts, policy + reference, KL controller and budget,
                                                      # the held-out evaluation
    run.track(parts.policy.trained, state=parts.state)
    parts.restore(run.resume())

The recipe's ``train()`` then calls each part where its algorithm needs it, and ends with :meth:`RLParts.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_dvpo.rlhf.kl_budget import KLBudget
from nemo_dvpo.rlhf.policy import PolicyModels, check_update_layout, kl_controller
from nemo_dvpo.rlhf.prompt_source import PromptSource
from nemo_dvpo.rlhf.report import HeldOutEvaluation, policy_summary
from nemo_dvpo.training.run import Run


@dataclass
class RLParts:
    prompts: PromptSource
    policy: PolicyModels
    # The KL coefficient's controller (adaptive or fixed) and the optional budget on the rollout KL.
    kl: Any
    kl_budget: KLBudget
    evaluation: HeldOutEvaluation

    @classmethod
    def build(cls, cfg, run: Run) -> "RLParts":
        """``cfg``: the recipe's :class:`~nemo_dvpo.rlhf.config.PolicyRunConfig`. The batch layout is checked
        before anything loads."""
        check_update_layout(cfg.ppo, cfg.rollout, run.data_parallel.size)
        prompts = PromptSource(cfg.data, cfg.rollout, cfg.eval, run.tokenizer, run.data_parallel, cfg.train.seed,
                               run.tag)
        policy = PolicyModels(cfg, run.model_cfg, len(run.tokenizer), cfg.seq_length, cfg.updates_per_step,
                              run.data_parallel)
        return cls(prompts, policy, kl_controller(cfg.kl),
                   KLBudget(cfg.train.kl_budget, policy.trained_parameters, policy.model, run.data_parallel, run.tag),
                   HeldOutEvaluation(run, prompts.heldout, cfg.eval))

    def state(self) -> dict:
        """What a checkpoint keeps besides the models: the KL coefficient and the score before training."""
        return {"kl_controller": self.kl.state_dict(), "eval_before": self.evaluation.before}

    def restore(self, saved: dict) -> None:
        if saved:
            self.kl.load_state_dict(saved["kl_controller"])
            self.evaluation.before = saved.get("eval_before")

    def finish(self, run: Run, fields: dict, metadata: dict) -> dict:
        """The end of the run: the final policy scored on the held-out prompts, saved (``metadata`` in its
        checkpoint) and exported, and ``summary.json`` (returned) with ``fields`` and the final KL."""
        self.evaluation.score_after(self.policy.model)
        final, hf_dir = run.save_final(self.policy.finalize(), extra=metadata, export_hf=run.cfg.export_hf)
        return policy_summary(run, {**fields, "final_kl": self.kl_budget.final_kl(run.last_metrics.get("rollout/kl")),
                                    "final_kl_coef": self.kl.value, "kl_budget": self.kl_budget.summary(run.final_step)},
                              self.evaluation, final, hf_dir)
