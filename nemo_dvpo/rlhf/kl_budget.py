"""``train.kl_budget``: stop before the policy drifts too far from the reference, keeping the last policy within it."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.utils.distributed import print_rank_zero


class KLBudget:
    """A budget on the rollout KL (``rollout/kl``: k1 summed over a response, mean over the batch) against
    over-optimising the scorer. The recipe feeds it the KL of each step's rollout - the KL of the policy after
    ``step`` updates - before updating; once a KL passes the budget, :meth:`return_to_within` puts back the newest
    policy measured within it (that step's update is discarded) and the recipe ends the run.

    The copy holds the trained parameters only (with LoRA: the adapters), once per model-parallel shard:
    data-parallel replicas are identical, so data-parallel rank 0 keeps it in host memory, overwritten in place
    each step (a run holds at most one), and the return broadcasts it. ``budget=None``: no budget.
    """

    def __init__(self, budget: Optional[float], trained_parameters: Callable[[], list[torch.nn.Parameter]],
                 policy: list[torch.nn.Module], data_parallel: DataParallel, tag: str):
        self.budget, self.trained_parameters, self.policy = budget, trained_parameters, policy
        self.data_parallel, self.tag = data_parallel, tag
        # The newest policy measured within the budget ({step, kl, weights}) and the step that passed it.
        self.within: Optional[dict] = None
        self.passed: Optional[dict] = None

    def watch(self, step: int, kl: float) -> bool:
        """Given the rollout KL of step ``step`` (every rank sees the same global KL, so all decide alike): keep a
        copy of the policy while within the budget; True once it is passed."""
        if self.budget is None:
            return False
        if kl > self.budget:
            self.passed = {"step": step, "kl": kl}
            return True
        weights = None
        if self.data_parallel.rank == 0:
            trained = self.trained_parameters()
            if self.within is None:
                weights = [param.detach().to("cpu", copy=True) for param in trained]
            else:
                weights = self.within["weights"]
                for kept, param in zip(weights, trained):
                    kept.copy_(param.detach())
        self.within = {"step": step, "kl": kl, "weights": weights}
        return False

    def return_to_within(self) -> int:
        """Put back the newest policy measured within the budget; returns the number of steps behind it."""
        passed, kept = self.passed, self.within
        if kept is None:
            # Only after a resume whose first measured policy is already over the budget: nothing older is held.
            print_rank_zero(f"[{self.tag}] rollout KL {passed['kl']:.3g} at step {passed['step'] + 1} passed "
                            f"train.kl_budget={self.budget:g}; no earlier policy of this run is in memory (it resumed "
                            "past it): stopping with the current policy")
            return passed["step"] + 1
        with torch.no_grad():
            if kept["weights"] is not None:
                for param, weights in zip(self.trained_parameters(), kept["weights"]):
                    param.copy_(weights)
        if self.data_parallel.size > 1:
            for module in self.policy:
                module.broadcast_params()  # Megatron DDP: from data-parallel rank 0 to the other replicas
        print_rank_zero(f"[{self.tag}] rollout KL {passed['kl']:.3g} at step {passed['step'] + 1} passed "
                        f"train.kl_budget={self.budget:g}: stopping; the final policy is the one after {kept['step']} "
                        f"steps (rollout KL {kept['kl']:.3g})")
        return kept["step"]

    def summary(self, final_step: int) -> Optional[dict]:
        """The budget's line of ``summary.json`` (None without a budget)."""
        if self.budget is None:
            return None
        passed = self.passed or {}
        return {"budget": self.budget, "final_policy_step": final_step,
                "passed_at_step": passed["step"] + 1 if passed else None, "passed_with_kl": passed.get("kl")}

    def final_kl(self, last_kl: Optional[float]) -> Optional[float]:
        """The final policy's rollout KL: the returned-to policy's when the budget was passed."""
        return self.within["kl"] if self.passed and self.within else last_kl
