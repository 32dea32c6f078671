"""How well a GVM ranks responses: held-out pairwise accuracy in the paper's forms (its Table 4).

Each response gets per-token values; a sequence-level score is the mean over response tokens, the
value of the last response token, or a percentile (P1, P5, P10, P90, P95, P99) of the response's
token values. A pair counts as correct when the chosen response scores strictly higher. An accuracy
over n pairs comes with its Wilson 95% interval (held-out sets are small: 9 of 12 is 47-91%).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

PERCENTILES = (1, 5, 10, 90, 95, 99)
SUMMARIES = ("mean", "last") + tuple(f"p{p}" for p in PERCENTILES)


def sequence_value_summaries(values: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence scores (batch,) from token values (batch, seq) over each response."""
    from nemo_dvpo.algorithms.gvm import last_response_index

    mask = response_mask.bool()
    values = values.float()
    num_tokens = mask.sum(dim=1).clamp(min=1)
    summaries = {
        "mean": (values * mask).sum(dim=1) / num_tokens,
        "last": values[torch.arange(values.shape[0]), last_response_index(mask)],
    }
    quantiles = torch.tensor([p / 100 for p in PERCENTILES])
    # Rows have different response lengths, so quantiles are taken row by row.
    per_row = torch.stack([torch.quantile(row[row_mask], quantiles) for row, row_mask in zip(values, mask)])
    for column, percentile in enumerate(PERCENTILES):
        summaries[f"p{percentile}"] = per_row[:, column]
    return summaries


def pairwise_accuracy(chosen: dict[str, torch.Tensor], rejected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of pairs whose chosen response scores strictly higher, for every summary."""
    return {name: (chosen[name] > rejected[name]).float().mean().item() for name in chosen}


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for the default ``z``).

    With p = k / n:  centre = (p + z^2 / 2n) / (1 + z^2 / n),
                     half-width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0% or 100%.
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def evaluate_pairs(model: list[torch.nn.Module], chosen_batches: Sequence, rejected_batches: Sequence
                   ) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accuracy of a GVM over pairs given as aligned batches (``tokens``, ``response_mask``).

    Collective (every rank passes the same batches). Returns (accuracy per summary, chosen
    summaries, rejected summaries), the summaries concatenated over batches.
    """
    from nemo_dvpo.models.value_model import token_values

    def summarise(batches) -> dict[str, torch.Tensor]:
        parts = [sequence_value_summaries(token_values(model, batch.tokens), batch.response_mask)
                 for batch in batches]
        return {name: torch.cat([part[name] for part in parts]) for name in SUMMARIES}

    chosen, rejected = summarise(chosen_batches), summarise(rejected_batches)
    return pairwise_accuracy(chosen, rejected), chosen, rejected


def value_statistics(values: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation of token values over response tokens."""
    response_values = values[response_mask.bool()].float()
    return {"mean": response_values.mean().item(), "std": response_values.std(unbiased=False).item(),
            "num_tokens": int(response_values.numel())}
