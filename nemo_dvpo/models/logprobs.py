"""Per-token log-probabilities and entropies from vocab-parallel logits, without gathering the vocabulary.

With tensor parallelism each rank holds a slice of the vocabulary's logits. ``log p(token)`` comes from
megatron-core's ``vocab_parallel_cross_entropy`` (max, sum-exp and the target's logit reduced over the
TP group, with its own backward); the entropy reduces the same partial sums. Both use the convention of
:mod:`nemo_dvpo.inference.generation`: the value for token ``t`` sits at position ``t`` (computed from
the logits at ``t - 1``); position 0 has none and holds 0.
"""

from __future__ import annotations

from typing import Optional

import torch


def _prepared(logits: torch.Tensor, vocab_size: Optional[int], temperature: float) -> torch.Tensor:
    """fp32 logits, padded vocabulary ids masked, divided by the temperature (the input itself when
    nothing changes)."""
    from megatron.core import parallel_state

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if vocab_size is not None:
        # Ids beyond the tokenizer's vocabulary only pad the output layer for TP; generation never
        # samples them, so they are no part of the policy's distribution either.
        shard = logits.shape[-1]
        first_id = parallel_state.get_tensor_model_parallel_rank() * shard
        padded = torch.arange(first_id, first_id + shard, device=logits.device) >= vocab_size
        if padded.any():
            logits = logits.masked_fill(padded, torch.finfo(logits.dtype).min)
    return logits


def _pad_front(per_token: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(per_token[:, :1]), per_token], dim=1)


def response_logit_span(response_mask: torch.Tensor) -> tuple[int, int]:
    """``(start, end)``: the positions whose logits predict a response token of some row, from the one
    before the earliest response token to the last but one (for
    :func:`nemo_dvpo.models.forward.logits_for_positions`)."""
    first_response = int(response_mask.float().argmax(dim=1).min())  # a row without response gives 0
    return max(first_response - 1, 0), response_mask.shape[1] - 1


def at_token_positions(per_target: torch.Tensor, start: int) -> torch.Tensor:
    """Per-target values of the logits ``start, start + 1, ...`` placed at their tokens' positions
    (``start + 1, ...``), zeros before: the layout of :func:`token_logprobs`."""
    return torch.cat([per_target.new_zeros(per_target.shape[0], start + 1), per_target], dim=1)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: Optional[int] = None,
                    temperature: float = 1.0, overwrite_logits: bool = False) -> torch.Tensor:
    """``log softmax(logits_i / T)[targets_i]``: (batch, n) from logits (batch, n, vocab/TP) that predict ``targets``.

    megatron-core's ``vocab_parallel_cross_entropy`` works in place on its input; ``overwrite_logits``
    lets it use ``logits`` (saving a copy of the largest tensor of the step) when the caller no longer
    needs them. Their gradient is unaffected.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    prepared = _prepared(logits, vocab_size, temperature)
    if prepared is logits and not overwrite_logits:
        prepared = logits.clone()
    if not prepared.is_contiguous():
        prepared = prepared.contiguous()
    return -vocab_parallel_cross_entropy(prepared, targets.contiguous())


# Without a gradient the entropy is computed a few rows at a time, so that its three vocabulary-wide temporaries
# (centred logits, their exp, the product) take about this much each instead of three times the logits: 2.4 GB for
# a rollout of 8 responses of 512 tokens at SmolLM2's 49,152 ids.
_NO_GRAD_CHUNK_BYTES = 64 * 2**20


def predictive_entropies(logits: torch.Tensor, vocab_size: Optional[int] = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each next-token distribution, (batch, n) from logits (batch, n, vocab/TP); differentiable.

    ``H = log Z - sum_v p_v z_v`` with ``Z = sum_v exp(z_v)``, the sums reduced over the TP group. When no
    gradient is wanted, row chunks of about ``_NO_GRAD_CHUNK_BYTES`` (the same on every TP rank: the shapes are).
    """
    if (torch.is_grad_enabled() and logits.requires_grad) or logits.numel() == 0:
        return _entropies(logits, vocab_size, temperature)
    rows_per_chunk = max(1, _NO_GRAD_CHUNK_BYTES // (4 * logits.shape[-1]))
    return torch.stack([torch.cat([_entropies(chunk, vocab_size, temperature)
                                   for chunk in row.split(rows_per_chunk)]) for row in logits])


def _entropies(logits: torch.Tensor, vocab_size: Optional[int], temperature: float) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    prepared = _prepared(logits, vocab_size, temperature)
    # The max only stabilises exp(); it cancels out, so it needs no gradient.
    logits_max = prepared.detach().amax(dim=-1, keepdim=True)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    centred = prepared - logits_max
    exp_logits = centred.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_logits.sum(dim=-1))
    sum_exp_times_logit = reduce_from_tensor_model_parallel_region((exp_logits * centred).sum(dim=-1))
    return sum_exp.log() - sum_exp_times_logit / sum_exp


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_size: Optional[int] = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits_{t-1} / T)[tokens_t]`` at position ``t``: (batch, seq) from (batch, seq, vocab/TP)."""
    return _pad_front(target_logprobs(logits[:, :-1], tokens[:, 1:], vocab_size, temperature))


def token_entropies(logits: torch.Tensor, vocab_size: Optional[int] = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution predicting token ``t``, at position ``t``; differentiable."""
    return _pad_front(predictive_entropies(logits[:, :-1], vocab_size, temperature))
