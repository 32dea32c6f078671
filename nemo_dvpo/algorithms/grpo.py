"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic.

Each prompt gets ``G`` sampled responses, each scored once by a frozen reward model, ``s_1 .. s_G``. A
response's advantage is its score standardised within its prompt's group, and every one of its tokens
carries it::

    A_{i,t} = (s_i - mean(s_1..s_G)) / (std(s_1..s_G) + eps)

(``std`` with Bessel's correction, as TRL computes it). The policy then takes PPO's clipped surrogate with the
KL to the reference as a loss term (``beta * k3``): :func:`nemo_dvpo.algorithms.ppo.policy_loss`.
"""

from __future__ import annotations

import torch


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Per-sequence advantages (batch,) from scores (batch,) laid out as consecutive groups of ``group_size``."""
    if group_size < 2:
        raise ValueError(f"group-relative advantages need at least 2 samples per prompt, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    groups = scores.float().view(-1, group_size)
    standardised = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    return standardised.view(-1)


def token_advantages(sequence_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's advantage at every one of its response tokens, 0 elsewhere."""
    return sequence_advantages.float()[:, None] * response_mask.float()
