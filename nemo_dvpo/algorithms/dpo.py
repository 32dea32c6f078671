"""Direct Preference Optimization (Rafailov et al. 2023): preferences without a reward model or RL.

With ``log pi(y|x)`` the summed log-probability of the response tokens, the implicit reward of a response is
``beta * (log pi_theta(y|x) - log pi_ref(y|x))`` and the loss the Bradley-Terry likelihood of the
preferred response ``y_c`` over the other ``y_r``::

    L = -E_pairs[ log sigma( beta * ((log pi_theta(y_c|x) - log pi_ref(y_c|x))
                                    - (log pi_theta(y_r|x) - log pi_ref(y_r|x))) ) ]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DPOResult(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor    # beta * (log pi - log pi_ref) of y_c, detached
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor          # share of pairs whose implicit reward prefers y_c, detached


def sequence_logprobs(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``log pi(y|x)``: the sum of a row's per-token log-probs over its response tokens."""
    return (token_logprobs.float() * response_mask.float()).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1) -> DPOResult:
    """The DPO loss over pairs from summed response log-probs (batch,) of policy and reference."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = beta * (policy_chosen.float() - reference_chosen.float())
    rejected = beta * (policy_rejected.float() - reference_rejected.float())
    margin = chosen - rejected
    return DPOResult(-F.logsigmoid(margin).mean(), chosen.detach(), rejected.detach(),
                     (margin > 0).float().mean().detach())
