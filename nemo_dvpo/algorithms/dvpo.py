"""Stage 2 of DVPO: PPO on the policy with advantages from the frozen Global Value Model.

Only the policy ``pi_theta`` trains. The frozen GVM ``V_phi`` gives a value at every response token
and the frozen reference ``pi_ref`` anchors the policy through a KL penalty; there is no reward model
and no critic. All tensors are (batch, seq) over whole sequences; ``response_mask`` marks the response
tokens (one contiguous run per row) and every statistic below is taken over those positions only.

Advantages, ``mode="value"`` (the paper): the batch-normalised GVM value::

    A_t = (V_phi(t) - mu_B) / (sigma_B + eps)

Advantages, ``mode="gae"`` (the authors' code): per-token rewards are the KL penalty alone,
``r_t = -beta * (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t))``; GAE runs over those rewards and the
normalised *state* values ``V'(s_t)``, with ``V'(s_{T+1}) := 0``, and the result is whitened again::

    delta_t = r_t + gamma * V'(s_{t+1}) - V'(s_t)
    A_t     = whiten(sum_k (gamma * lam)^k delta_{t+k})

``V(s_t)`` is the value of the state *before* token ``a_t`` is chosen: the GVM's value at position
``t - 1``. (Its value at ``t`` has seen ``a_t``, an action value; subtracting that would push the policy
away from exactly the tokens the GVM rates highly. TRL-style PPO code, which the authors' code forks,
aligns values the same way.) With no reward but the KL, the GVM enters the gradient only through
GAE's bootstrapping (``lam < 1``): ``A_t`` credits ``a_t`` with the discounted value changes that follow.

Policy loss, PPO's clipped surrogate with ``rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)``::

    L_clip = E_t[ max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_c, 1 + eps_c)) ]

With ``kl_placement="loss"`` the KL enters the loss instead of the rewards,
``L = L_clip + beta * E_t[k3_t]`` with ``k3_t = exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0,
with a gradient that is the KL's); an entropy bonus subtracts ``c_H * E_t[H_t]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.gvm import DEFAULT_GAMMA, DEFAULT_LAMBDA, lambda_returns
from nemo_dvpo.algorithms.ppo import state_values

ADVANTAGE_MODES = ("value", "gae")
KL_ESTIMATORS = ("k1", "k2", "k3")


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


class Advantages(NamedTuple):
    advantages: torch.Tensor
    # The GVM values as normalised for the advantages, at each response token (mode "gae": the value
    # of the state before the token); 0 outside the response.
    normalized_values: torch.Tensor
    # Per-token KL-penalty rewards (0 in mode "value", where the KL is a loss term).
    kl_rewards: torch.Tensor


def compute_advantages(gvm_values: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       response_mask: torch.Tensor, mode: str = "value", kl_coef: float = 0.0,
                       gamma: float = DEFAULT_GAMMA, lam: float = DEFAULT_LAMBDA,
                       value_stats: Optional[tuple[float, float]] = None, eps: float = 1e-8,
                       group: Optional[dist.ProcessGroup] = None) -> Advantages:
    """Per-token advantages from frozen GVM values (see the module docstring for both modes).

    ``value_stats=(mean, std)`` normalises the GVM values by fixed statistics (those stored with the
    GVM, from its training data) instead of the batch's. ``group`` makes the batch statistics those
    of all data-parallel ranks. ``kl_coef`` only enters mode "gae"; in mode "value" the KL belongs
    in the loss (:func:`policy_loss`).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
    mask = response_mask.bool()
    if mode == "gae":
        # State values: token t's baseline is the GVM's value at t - 1, before the token was chosen.
        gvm_values = state_values(gvm_values)
    if value_stats is None:
        normalized_values = masked_normalize(gvm_values, mask, eps=eps, group=group)
    else:
        value_mean, value_std = value_stats
        normalized = (gvm_values.float() - value_mean) / (value_std + eps)
        normalized_values = torch.where(mask, normalized, torch.zeros_like(normalized))
    if mode == "value":
        return Advantages(normalized_values, normalized_values, torch.zeros_like(normalized_values))
    kl_rewards = torch.where(mask, -kl_coef * kl_estimate(logprobs, ref_logprobs, "k1"),
                             torch.zeros_like(normalized_values))
    # GAE advantages are lambda-returns minus the values they bootstrap from.
    gae = lambda_returns(normalized_values, kl_rewards, mask, gamma, lam) - normalized_values
    return Advantages(masked_normalize(gae, mask, eps=eps, group=group), normalized_values, kl_rewards)


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
