"""PPO with a learned critic (Ouyang et al. 2022; Ziegler et al. 2019): rewards, GAE and the value loss.

The policy's objective is :func:`nemo_dvpo.algorithms.dvpo.policy_loss` (the clipped surrogate); this module
holds what a critic adds. Tensors are (batch, seq) over whole sequences; ``response_mask`` marks each row's
response (one contiguous run) and ``a_t`` is the token at position ``t``.

Rewards: a frozen reward model scores the whole response once, ``s``; by default the scores are whitened over
the rollout's sequences, ``s' = (s - mean(s)) / std(s)`` (:func:`normalize_scores`: a Bradley-Terry model fixes
only score differences, so its raw scale is arbitrary - a small one leaves the per-token KL in nats to outweigh
it). The KL to the reference is paid per token, and the score arrives at the last response token ``T``::

    r_t = -beta * (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)) + [t == T] * s'

State values: ``V(s_t)`` is the critic's value at the position *before* ``a_t`` (it has not seen the token
yet), :func:`state_values`. GAE (gamma, lambda) with ``V(s_{T+1}) := 0``::

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t     = sum_k (gamma * lam)^k delta_{t+k},      R_t = A_t + V(s_t)

then ``A`` is whitened over the batch's response tokens. The critic regresses onto ``R`` with PPO's
clipped value loss around the rollout's values ``V_old``::

    L_V = 0.5 * E_t[ max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2) ]
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.gvm import DEFAULT_GAMMA, DEFAULT_LAMBDA, lambda_returns, last_response_index


def state_values(values: torch.Tensor) -> torch.Tensor:
    """``V(s_t)``: each position's value taken from the position before it (the state before ``a_t``)."""
    return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """``-beta * (logp - ref_logp)`` at response tokens (the k1 estimate of the KL), 0 elsewhere."""
    mask = response_mask.bool()
    penalty = -kl_coef * (logprobs.float() - ref_logprobs.float())
    return torch.where(mask, penalty, torch.zeros_like(penalty))


def normalize_scores(scores: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``(s - mean(s)) / std(s)`` over the batch's sequences (of all ranks in ``group``; std Bessel-corrected)."""
    from nemo_dvpo.algorithms.dvpo import masked_normalize

    return masked_normalize(scores.float(), torch.ones_like(scores, dtype=torch.bool), group=group)


def ppo_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                response_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: the KL penalty everywhere, plus the sequence's score at its last response token."""
    rewards = kl_penalty_rewards(logprobs, ref_logprobs, response_mask, kl_coef)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_response_index(response_mask)] += scores.float()
    return rewards


class GAE(NamedTuple):
    advantages: torch.Tensor  # whitened over the batch's response tokens
    returns: torch.Tensor     # the critic's targets R_t (not whitened)


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = DEFAULT_GAMMA,
        lam: float = DEFAULT_LAMBDA, group: Optional[dist.ProcessGroup] = None) -> GAE:
    """GAE advantages (whitened over response tokens of all ranks in ``group``) and returns.

    ``values`` are state values ``V(s_t)`` (see :func:`state_values`), treated as constants.
    """
    from nemo_dvpo.algorithms.dvpo import masked_normalize

    returns = lambda_returns(values, rewards, response_mask, gamma, lam)
    advantages = (returns - values.detach().float()) * response_mask.float()
    return GAE(masked_normalize(advantages, response_mask, group=group), returns)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               clip: Optional[float] = 0.2, token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PPO's clipped value loss ``0.5 * E_t[max((V - R)^2, (clip(V, V_old +- clip) - R)^2)]``.

    ``clip=None`` is the plain squared error. ``E_t`` is a mean over response tokens, or their sum over
    ``token_count`` (the global count of a batch split into micro-batches).
    """
    from nemo_dvpo.algorithms.dvpo import token_average

    values = values.float()
    returns = returns.detach().float()
    squared = (values - returns) ** 2
    if clip is not None:
        old_values = old_values.detach().float()
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        squared = torch.maximum(squared, (clipped - returns) ** 2)
    return 0.5 * token_average(squared, response_mask.bool(), token_count)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over response tokens: 1 for a perfect critic, 0 for a constant one."""
    mask = response_mask.bool()
    returns, residuals = returns[mask].float(), (returns - values)[mask].float()
    variance = returns.var(unbiased=False)
    return float(1.0 - residuals.var(unbiased=False) / variance) if variance > 0 else float("nan")
