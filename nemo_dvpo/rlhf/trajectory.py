"""One step's rollout, as tensors: what the update needs and nothing else (no texts, no records)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Trajectory(NamedTuple):
    """The sequences a data-parallel rank sampled in one step, laid out (batch, seq) unless noted.

    Row ``b`` is prompt + response, right-padded; ``response_mask`` marks the response tokens. Per-token
    quantities sit at the token's own position (``old_logprobs[b, t]`` is ``log pi_old(tokens[b, t] | ...)``)
    and are 0 outside the response.
    """

    tokens: torch.Tensor            # int64
    response_mask: torch.Tensor     # bool
    sequence_lengths: torch.Tensor  # (batch,) prompt + response length of each row
    old_logprobs: torch.Tensor      # the policy that sampled (PPO's pi_old)
    ref_logprobs: torch.Tensor      # the frozen reference
    values: torch.Tensor            # the scorer's per-token values (DVPO: the frozen GVM; PPO: the critic)
    advantages: torch.Tensor
    returns: Optional[torch.Tensor] = None  # value targets, for algorithms that train a critic

    def rows(self, index: torch.Tensor, length: Optional[int] = None) -> "Trajectory":
        """The rows ``index``, cut to ``length`` positions (the trailing padding they all share)."""
        return Trajectory(*(None if field is None else
                            field[index] if field.dim() == 1 else field[index, :length]
                            for field in self))

    @property
    def num_response_tokens(self) -> torch.Tensor:
        return self.response_mask.sum()
