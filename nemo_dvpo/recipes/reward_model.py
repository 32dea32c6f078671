"""A Bradley-Terry reward model (examples/train_reward_model.py): the value-model recipe of
:mod:`nemo_dvpo.recipes.gvm` with ``train.objective=bradley_terry`` - this module's objective.

The value head read at each response's last token is its reward; the loss is
:func:`~nemo_dvpo.algorithms.reward.bradley_terry_loss` over the pairs of a micro-batch (a pair's two sequences
always share one). Checkpoints say kind ``reward_model``.
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_dvpo.algorithms.gvm import last_response_index
from nemo_dvpo.algorithms.reward import bradley_terry_loss, pair_rows
from nemo_dvpo.data.preference import TokenizedPreferenceData, ValueBatch
from nemo_dvpo.utils.errors import ConfigError


class BradleyTerryObjective:
    """``-log sigmoid(r_chosen - r_rejected)`` on the value at each response's last token."""

    kind = "reward_model"
    # The held-out accuracy shown while training: a reward model is read at the last token.
    headline_accuracy = "last"

    def __init__(self, train):
        if train.micro_batch_size % 2 or train.passes_per_batch != 1:
            raise ConfigError("train.objective=bradley_terry needs an even train.micro_batch_size (whole pairs) and "
                              "train.passes_per_batch=1")

    def check_data(self, data: TokenizedPreferenceData, path: str) -> None:
        if any(sample.pair_id is None for sample in data.samples):
            raise ConfigError(f"train.objective=bradley_terry learns from pairs, but {path} holds scored records "
                              "(prompt / response / score): give pairwise data (prompt / chosen / rejected)")

    def with_targets(self, model, micro_batches: list) -> list:
        return micro_batches  # no targets: the loss compares the two responses of each pair

    def loss(self, values: torch.Tensor, batch: ValueBatch, fixed_targets: Optional[torch.Tensor]):
        chosen, rejected = pair_rows(batch.pair_ids.cpu(), batch.is_chosen.cpu())
        rewards = values.gather(1, last_response_index(batch.response_mask)[:, None]).squeeze(1)
        result = bradley_terry_loss(rewards[chosen.to(values.device)], rewards[rejected.to(values.device)])
        return result.loss, {"loss": result.loss.detach(), "pair_accuracy": result.accuracy,
                             "reward_margin": result.margin, "reward_mean": rewards.detach().mean()}
