"""A policy's greedy answers to held-out verifiable prompts, scored with the IFEval checkers (strict).

The score of one answer is the fraction of its prompt's instructions it follows
(:func:`nemo_dvpo.data.verifiable.score_response`). Before/after comparisons over the same prompts use
the paired difference, whose interval is much tighter than the difference of two means.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from nemo_dvpo.data.prompts import PromptSet
from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.training.data_parallel import DataParallel


class EvaluationInterrupted(Exception):
    """A stop was requested during an evaluation (raised on every rank at the same batch)."""


def confidence_interval_95(scores: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    count = len(scores)
    mean = sum(scores) / count
    if count < 2:
        return mean, float("nan")
    variance = sum((score - mean) ** 2 for score in scores) / (count - 1)
    return mean, 1.96 * math.sqrt(variance / count)


def evaluate_verifiable(policy, tokenizer, prompts: PromptSet, data_parallel: DataParallel, *, batch_size: int,
                        max_new_tokens: int, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Score greedy answers to ``prompts``; each data-parallel rank answers every ``size``-th prompt.

    ``should_stop`` is asked after every batch, on every rank the same number of times (collective);
    when it answers True, :class:`EvaluationInterrupted` is raised.
    """
    from nemo_dvpo.data.verifiable import score_response

    mine = list(range(data_parallel.rank, len(prompts), data_parallel.size))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    scores: dict[int, float] = {}
    # The same number of batches on every rank (the last may be empty), so the stop checks line up.
    per_rank = math.ceil(len(prompts) / data_parallel.size)
    for start in range(0, per_rank, batch_size):
        batch = mine[start:start + batch_size]
        if batch:
            output = generate(policy, tokenizer, [prompts.token_ids[i] for i in batch], sampling)
            for index, text in zip(batch, output.response_texts):
                scores[index] = score_response(prompts.records[index], text)
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted()
    scores = {index: score for part in data_parallel.gather_objects(scores) for index, score in part.items()}
    ordered = [scores[i] for i in sorted(scores)]
    mean, half_width = confidence_interval_95(ordered)
    return {"mean": mean, "ci95": half_width, "num_prompts": len(ordered),
            "all_followed": sum(score == 1.0 for score in ordered) / len(ordered),
            "prompt_ids": [prompts.records[i].get("prompt_id", i) for i in sorted(scores)], "scores": ordered}


def paired_change(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Mean per-prompt change and its 95% interval, when both evaluations scored the same prompts."""
    if not before or not after or before["prompt_ids"] != after["prompt_ids"]:
        return None
    mean, half_width = confidence_interval_95([b - a for a, b in zip(before["scores"], after["scores"])])
    return {"mean": mean, "ci95": half_width, "num_prompts": len(after["scores"])}
