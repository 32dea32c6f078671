"""PPO (Schulman et al. 2017) for language models: the clipped policy loss every RL recipe shares, and what a
learned critic adds (Ouyang et al. 2022; Ziegler et al. 2019): rewards, GAE and the value loss.

Tensors are (batch, seq) over whole sequences; ``response_mask`` marks each row's response (one contiguous
run), ``a_t`` is the token at position ``t`` and every statistic is taken over response tokens. Where the
advantages come from is each algorithm's own: :mod:`nemo_dvpo.algorithms.dvpo` (a frozen GVM),
:mod:`nemo_dvpo.algorithms.grpo` (group-relative scores), or the critic below.

Policy loss, PPO's clipped surrogate with ``rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)``::

    L_clip = E_t[ max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_c, 1 + eps_c)) ]

With ``kl_placement="loss"`` the KL enters the loss instead of the rewards,
``L = L_clip + beta * E_t[k3_t]`` with ``k3_t = exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0,
with a gradient that is the KL's); an entropy bonus subtracts ``c_H * E_t[H_t]``.

The critic. Rewards: a frozen reward model scores the whole response once, ``s``; by default the scores are whitened over
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

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.gvm import DEFAULT_GAMMA, DEFAULT_LAMBDA, lambda_returns, last_response_index

KL_ESTIMATORS = ("k1", "k2", "k3")


# -- masked statistics -----------------------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum of ``x`` over masked positions, all-reduced over ``group`` (e.g. data-parallel ranks) if given."""
    total = (x.float() * mask.float()).sum()
    if group is not None:
        from nemo_dvpo.utils.distributed import all_reduce_on_device

        total = all_reduce_on_device(total, group=group)
    return total


def masked_mean(x: torch.Tensor, mask: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions (of all ranks in ``group``); an empty mask is an error."""
    count = masked_sum(torch.ones_like(x, dtype=torch.float32), mask, group)
    if count == 0:
        raise ValueError("the mask selects no positions")
    return masked_sum(x, mask, group) / count


def masked_normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True,
                     group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``(x - mu) / (sigma + eps)`` on masked positions, 0 elsewhere.

    ``mu`` and ``sigma`` (Bessel-corrected) are taken over masked positions only - of all ranks in
    ``group`` when given, so data-parallel ranks normalise by the statistics of the global batch.
    Prompt and padding positions never enter them (the authors' code lets them leak in).
    ``shift_mean=False`` scales without re-centring.
    """
    mask = mask.bool()
    x = x.float()
    count = masked_sum(torch.ones_like(x), mask, group)
    if count < 2:
        raise ValueError(f"normalising needs at least 2 masked positions, got {int(count)}")
    mean = masked_sum(x, mask, group) / count
    variance = masked_sum((x - mean) ** 2, mask, group) / (count - 1)
    normalized = (x - mean) / (variance.sqrt() + eps) if shift_mean else x / (variance.sqrt() + eps)
    return torch.where(mask, normalized, torch.zeros_like(normalized))


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    With ``log_ratio = logp - ref_logp``: k1 = log_ratio (the authors' reward), k2 = log_ratio^2 / 2,
    k3 = exp(-log_ratio) + log_ratio - 1 (non-negative, unbiased).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


# -- the clipped policy loss -----------------------------------------------------------------------------

class PPOLossStats(NamedTuple):
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def token_average(x: torch.Tensor, mask: torch.Tensor, token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``E_t[x_t]`` over masked tokens: their mean, or with ``token_count`` their sum over that count.

    A loss computed on one micro-batch of a larger batch passes the batch's token count (over all
    micro-batches and data-parallel ranks): the micro-batch losses then add up to the exact token mean.
    """
    return masked_mean(x, mask) if token_count is None else masked_sum(x, mask) / token_count


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  response_mask: torch.Tensor, clip: float = 0.2,
                  token_count: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, PPOLossStats]:
    """``E_t[max(-A_t rho_t, -A_t clip(rho_t, 1-clip, 1+clip))]`` over response tokens, and statistics.

    ``clip_fraction`` is the share of tokens where the clipped branch is taken; ``approx_kl`` is
    KL(pi_old || pi_theta) estimated by k3 on the sampled tokens (0 before the first update). The
    statistics are means over this call's tokens; the loss is :func:`token_average`.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    mask = response_mask.bool()
    log_ratio = logprobs.float() - old_logprobs.float().detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = token_average(torch.maximum(unclipped, clipped), mask, token_count)
    with torch.no_grad():
        stats = PPOLossStats(
            clip_fraction=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    # For the logs: means over this call's tokens (detached).
    pg_loss: torch.Tensor
    kl_loss: torch.Tensor
    entropy: torch.Tensor
    stats: PPOLossStats


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, response_mask: torch.Tensor, clip: float = 0.2,
                kl_loss_coef: float = 0.0, entropy: Optional[torch.Tensor] = None,
                entropy_coef: float = 0.0, token_count: Optional[torch.Tensor] = None) -> PolicyLoss:
    """``L_clip + beta * E_t[k3_t] - c_H * E_t[H_t]`` (the last two only when their coefficients are > 0).

    ``E_t`` is :func:`token_average` (a mean, or a sum over ``token_count``); the logged parts are means.
    """
    pg_loss, stats = ppo_clip_loss(logprobs, old_logprobs, advantages, response_mask, clip, token_count)
    mask = response_mask.bool()
    kl = kl_estimate(logprobs, ref_logprobs, "k3")
    loss = pg_loss
    if kl_loss_coef > 0:
        loss = loss + kl_loss_coef * token_average(kl, mask, token_count)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy")
        loss = loss - entropy_coef * token_average(entropy, mask, token_count)
    with torch.no_grad():
        pg_mean = pg_loss if token_count is None else ppo_clip_loss(logprobs, old_logprobs, advantages,
                                                                    response_mask, clip)[0]
        mean_entropy = masked_mean(entropy, mask) if entropy is not None else torch.zeros(())
        return PolicyLoss(loss, pg_mean.detach(), masked_mean(kl, mask).detach(), mean_entropy.detach(), stats)


# -- the critic ------------------------------------------------------------------------------------------



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
    returns = lambda_returns(values, rewards, response_mask, gamma, lam)
    advantages = (returns - values.detach().float()) * response_mask.float()
    return GAE(masked_normalize(advantages, response_mask, group=group), returns)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               clip: Optional[float] = 0.2, token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PPO's clipped value loss ``0.5 * E_t[max((V - R)^2, (clip(V, V_old +- clip) - R)^2)]``.

    ``clip=None`` is the plain squared error. ``E_t`` is a mean over response tokens, or their sum over
    ``token_count`` (the global count of a batch split into micro-batches).
    """
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


# -- KL coefficient controllers ------------------------------------------------------------------

@dataclass
class FixedKLController:
    """``beta`` stays at its initial value."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): steer the measured KL towards ``target`` over ``horizon`` samples::

        e = clip(KL / target - 1, -0.2, 0.2);    beta <- beta * (1 + e * n_steps / horizon)
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {self.target}, {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
