"""Vocab-parallel token log-probs and entropies against plain log_softmax over the full vocabulary."""

from __future__ import annotations

import pytest
import torch

from nemo_dvpo.models.logprobs import token_entropies, token_logprobs


@pytest.fixture
def logits_and_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator) * 3
    tokens = torch.randint(0, 9, (2, 5), generator=generator)
    return logits, tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_log_softmax_of_the_previous_position(megatron_single_rank, logits_and_tokens,
                                                                   temperature):
    logits, tokens = logits_and_tokens
    expected = torch.zeros(2, 5)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    for row in range(2):
        for t in range(1, 5):
            expected[row, t] = log_probs[row, t - 1, tokens[row, t]]
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=temperature), expected)


def test_padded_vocabulary_ids_are_no_part_of_the_distribution(megatron_single_rank, logits_and_tokens):
    logits, tokens = logits_and_tokens
    expected = torch.log_softmax(logits[:, :-1, :9], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, vocab_size=9)[:, 1:], expected)
    probs = torch.softmax(logits[:, :-1, :9], dim=-1)
    expected_entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(token_entropies(logits, vocab_size=9)[:, 1:], expected_entropy)


def test_entropy_value_and_gradient_match_autograd_reference(megatron_single_rank, logits_and_tokens):
    logits, _ = logits_and_tokens
    ours_input = logits.clone().requires_grad_()
    reference_input = logits.clone().requires_grad_()
    ours = token_entropies(ours_input, temperature=0.7)
    probs = torch.softmax(reference_input[:, :-1] / 0.7, dim=-1)
    reference = -(probs * torch.log_softmax(reference_input[:, :-1] / 0.7, dim=-1)).sum(-1)
    torch.testing.assert_close(ours[:, 1:], reference)
    assert torch.all(ours[:, 0] == 0)
    ours.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(ours_input.grad, reference_input.grad)
