"""Stage 1 of DVPO: the Global Value Model's TD(lambda) objective.

A GVM ``V_phi`` reads a prompt and a response and predicts, at every response token ``t``, the
return-to-go of the response's final preference label. With no intermediate rewards, the reward
is zero everywhere except on the last response token ``T``, which carries the label ``y``
(+1 chosen / -1 rejected, or a reward-model score)::

    r_t = y if t == T else 0

The regression targets are lambda-returns computed with GAE over the model's own values, held
fixed (no gradient), with the bootstrap value after ``T`` equal to 0::

    delta_t = r_t + gamma * V(t+1) - V(t)            V(T+1) := 0
    A_t     = delta_t + gamma * lam * A_{t+1}         A_{T+1} := 0
    R_t     = A_t + V(t)

``lam = 1`` gives Monte-Carlo returns ``R_t = sum_{k>=t} gamma^(k-t) r_k`` (every token regresses
onto the discounted final label); ``lam = 0`` gives TD(0), ``R_t = r_t + gamma * V(t+1)``, the
paper's equation (1). The loss is ``0.5 * E_t[(V(t) - R_t)^2]`` over response tokens. Defaults
follow the authors' code: ``gamma = 1``, ``lam = 0.95``.

All tensors are laid out over the whole sequence, (batch, seq), with ``response_mask`` marking
the response tokens (one contiguous run per row, after the prompt and before any padding).
"""

from __future__ import annotations

import torch

DEFAULT_GAMMA = 1.0
DEFAULT_LAMBDA = 0.95


def last_response_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token; rows without one are an error."""
    response_mask = response_mask.bool()
    if not response_mask.any(dim=1).all():
        empty_rows = (~response_mask.any(dim=1)).nonzero().squeeze(-1).tolist()
        raise ValueError(f"rows {empty_rows} have no response tokens")
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return torch.where(response_mask, positions, -1).amax(dim=1)


def terminal_rewards(labels: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``r_t``: zeros everywhere, the sequence label on the last response token.

    labels: (batch,) float; response_mask: (batch, seq). Returns (batch, seq) in the labels' dtype.
    """
    rewards = torch.zeros(response_mask.shape, dtype=labels.dtype, device=labels.device)
    rows = torch.arange(response_mask.shape[0], device=labels.device)
    rewards[rows, last_response_index(response_mask)] = labels
    return rewards


def lambda_returns(values: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor,
                   gamma: float = DEFAULT_GAMMA, lam: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """``R_t = A_t + V(t)`` with GAE advantages over response tokens; 0 outside the response.

    ``values`` are treated as constants (detached): the targets must not pull on the prediction
    they are compared with. The backward recursion runs over the whole sequence; a position whose
    successor is not a response token (the last response token, or any prompt token) bootstraps
    from 0, which is exactly ``V(T+1) := 0`` for the contiguous response run.
    """
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    values = values.detach().float()
    rewards = rewards.float()
    mask = response_mask.float()
    batch_size, seq_length = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(batch_size, device=values.device)
    next_advantage = torch.zeros(batch_size, device=values.device)
    for t in reversed(range(seq_length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # What position t-1 bootstraps from: this position's value, if it is a response token.
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return (advantages + values) * mask


def gvm_loss(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``0.5 * masked mean of (V(t) - R_t)^2`` over all response tokens of the batch."""
    mask = response_mask.float()
    num_tokens = mask.sum()
    if num_tokens == 0:
        raise ValueError("the batch has no response tokens")
    squared_error = (values.float() - returns.detach().float()) ** 2
    return 0.5 * (squared_error * mask).sum() / num_tokens
