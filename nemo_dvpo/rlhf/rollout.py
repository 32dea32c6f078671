"""Sampling a rollout from the policy, and per-token log-probabilities of any GPT over a rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from nemo_dvpo.inference.generation import GenerationOutput, SamplingConfig, generate

OldLogprobs = Literal["generation", "recompute"]


@dataclass
class Sample:
    """A policy's responses to a batch of prompts, with the log-probs PPO's ratio starts from."""

    generation: GenerationOutput
    # log pi_old at each response token: the sampler's, or a forward pass's ("recompute").
    old_logprobs: torch.Tensor
    # Entropy of the sampling distribution at each response token (only with "recompute").
    entropy: Optional[torch.Tensor] = None
    # What the rollout engine measured, named as logged (a vLLM engine's refit time and log-prob gap).
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> torch.Tensor:
        return self.generation.tokens

    @property
    def response_mask(self) -> torch.Tensor:
        return self.generation.response_mask

    @property
    def sequence_lengths(self) -> torch.Tensor:
        return self.generation.prompt_lengths + self.generation.response_lengths


def token_logprobs(model: list[torch.nn.Module], tokens: torch.Tensor, response_mask: torch.Tensor, *,
                   vocab_size: int, temperature: float = 1.0, micro_batch_size: Optional[int] = None,
                   with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log pi(tokens_t | tokens_<t)`` at every response position (0 elsewhere), and optionally the entropy.

    Collective over the model's parallel group, without gradients. Only the positions that predict a
    response token are projected to the vocabulary (``logit_span``): prompt logits are never needed.
    """
    from nemo_dvpo.models.forward import forward_only
    from nemo_dvpo.models.logprobs import at_token_positions, predictive_entropies, response_logit_span
    from nemo_dvpo.models.logprobs import target_logprobs

    start, end = response_logit_span(response_mask)

    def reduce(logits: torch.Tensor, micro_tokens: torch.Tensor) -> torch.Tensor:
        # The entropy first: the log-probs then reuse the logits' memory in place.
        entropy = predictive_entropies(logits, vocab_size, temperature) if with_entropy else None
        logprobs = target_logprobs(logits, micro_tokens[:, start + 1:], vocab_size, temperature,
                                   overwrite_logits=True)
        parts = [at_token_positions(logprobs, start)]
        if entropy is not None:
            parts.append(at_token_positions(entropy, start))
        return torch.stack(parts, dim=-1)

    width = 2 if with_entropy else 1
    both = forward_only(model, tokens, reduce, (*tokens.shape, width), micro_batch_size=micro_batch_size,
                        logit_span=(start, end))
    mask = response_mask.to(both.dtype)
    return both[..., 0] * mask, (both[..., 1] * mask if with_entropy else None)


def sample_rollout(policy: list[torch.nn.Module], tokenizer, prompt_token_ids: Sequence[Sequence[int]],
                   sampling: SamplingConfig, *, old_logprobs: OldLogprobs = "generation",
                   vocab_size: Optional[int] = None, micro_batch_size: Optional[int] = None) -> Sample:
    """Sample one response per prompt from ``policy`` (collective over its model-parallel group).

    ``old_logprobs="generation"`` keeps the sampler's log-softmax of the very logits it drew from
    (KV-cache path; equal to a full forward pass within float rounding): PPO's first ratio is 1 without
    another forward pass. ``"recompute"`` runs a policy forward pass (and measures the entropy).
    """
    generation = generate(policy, tokenizer, prompt_token_ids, sampling)
    if old_logprobs == "generation":
        return Sample(generation, generation.logprobs)
    logprobs, entropy = token_logprobs(policy, generation.tokens, generation.response_mask,
                                       vocab_size=vocab_size or len(tokenizer), temperature=sampling.temperature,
                                       micro_batch_size=micro_batch_size, with_entropy=True)
    return Sample(generation, logprobs, entropy)
