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

The loss is PPO's clipped surrogate with the KL in the loss or the rewards, :mod:`nemo_dvpo.algorithms.ppo`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.gvm import DEFAULT_GAMMA, DEFAULT_LAMBDA, lambda_returns
from nemo_dvpo.algorithms.ppo import kl_estimate, masked_normalize, state_values

ADVANTAGE_MODES = ("value", "gae")


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
    in the loss (:func:`nemo_dvpo.algorithms.ppo.policy_loss`).
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
