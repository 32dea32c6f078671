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


def _shifted_logits(logits: torch.Tensor, vocab_size: Optional[int], temperature: float) -> torch.Tensor:
    """fp32 logits at positions 0..s-2 (those predicting tokens 1..s-1), padded ids masked, tempered."""
    from megatron.core import parallel_state

    logits = logits[:, :-1].float()
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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_size: Optional[int] = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits_{t-1} / T)[tokens_t]`` at position ``t``: (batch, seq) from (batch, seq, vocab/TP)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    shifted = _shifted_logits(logits, vocab_size, temperature)
    # vocab_parallel_cross_entropy expects (seq, batch, vocab) and returns (seq, batch).
    negative_logprobs = vocab_parallel_cross_entropy(shifted.transpose(0, 1).contiguous(),
                                                     tokens[:, 1:].transpose(0, 1).contiguous())
    return _pad_front(-negative_logprobs.transpose(0, 1))


def token_entropies(logits: torch.Tensor, vocab_size: Optional[int] = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution predicting token ``t``, at position ``t``; differentiable.

    ``H = log Z - sum_v p_v z_v`` with ``Z = sum_v exp(z_v)``, the sums reduced over the TP group.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    shifted = _shifted_logits(logits, vocab_size, temperature)
    # The max only stabilises exp(); it cancels out, so it needs no gradient.
    logits_max = shifted.detach().amax(dim=-1, keepdim=True)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    centred = shifted - logits_max
    exp_logits = centred.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_logits.sum(dim=-1))
    sum_exp_times_logit = reduce_from_tensor_model_parallel_region((exp_logits * centred).sum(dim=-1))
    entropy = sum_exp.log() - sum_exp_times_logit / sum_exp
    return _pad_front(entropy)
