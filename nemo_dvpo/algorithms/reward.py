"""A Bradley-Terry reward model (Ouyang et al. 2022): a scalar score per (prompt, response) from pairs.

The model is the policy's architecture with a value head (the GVM's), read at the response's last token:
``r(x, y) = V(x, y)_T``. With ``y_c`` preferred over ``y_r``, the probability of that preference is
``sigma(r(x, y_c) - r(x, y_r))``; the loss is its negative log-likelihood over pairs::

    L = -E_pairs[ log sigma(r_c - r_r) ]

and the pairwise accuracy is the share of pairs with ``r_c > r_r``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairwiseResult(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor  # detached
    margin: torch.Tensor    # mean r_c - r_r, detached


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PairwiseResult:
    """``-mean log sigma(r_c - r_r)`` over pairs (the i-th chosen with the i-th rejected)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.numel() == 0:
        raise ValueError(f"need as many chosen as rejected rewards, got {tuple(chosen_rewards.shape)} and "
                         f"{tuple(rejected_rewards.shape)}")
    margin = chosen_rewards.float() - rejected_rewards.float()
    return PairwiseResult(-F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach(),
                          margin.mean().detach())


def pair_rows(pair_ids: torch.Tensor, is_chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(chosen, rejected)`` of the complete pairs of a batch, pair by pair.

    Raises when a pair is split across batches: pairwise losses need both sequences of a pair together.
    """
    chosen_rows, rejected_rows = [], []
    rows_of: dict[int, dict[bool, int]] = {}
    for row, (pair, chosen) in enumerate(zip(pair_ids.tolist(), is_chosen.tolist())):
        if pair < 0:
            raise ValueError("a pairwise loss needs pairwise records (prompt / chosen / rejected)")
        rows_of.setdefault(pair, {})[bool(chosen)] = row
    for pair, rows in rows_of.items():
        if set(rows) != {True, False}:
            raise ValueError(f"pair {pair} is split across micro-batches (only its "
                             f"{'chosen' if True in rows else 'rejected'} response is in this one)")
        chosen_rows.append(rows[True])
        rejected_rows.append(rows[False])
    return torch.tensor(chosen_rows, dtype=torch.long), torch.tensor(rejected_rows, dtype=torch.long)
