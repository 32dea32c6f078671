"""Vocab-parallel token log-probs and entropies against plain log_softmax over the full vocabulary."""

from __future__ import annotations

import pytest
import torch

from nemo_dvpo.models.logprobs import (
    at_token_positions, predictive_entropies, response_logit_span, target_logprobs, token_entropies, token_logprobs,
)


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


def test_entropy_without_gradient_is_the_same_a_few_rows_at_a_time(megatron_single_rank, monkeypatch):
    """No gradient wanted: row chunks of at most _NO_GRAD_CHUNK_BYTES of fp32 logits - here 2 rows of 11, so each
    sequence's 5 positions split 2 + 2 + 1 - with the values of the whole-tensor computation."""
    from nemo_dvpo.models import logprobs

    logits = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(1)) * 3
    probs = torch.softmax(logits[:, :-1, :9] / 0.7, dim=-1)
    reference = -(probs * probs.log()).sum(-1)
    whole = logprobs._entropies(logits[:, :-1], 9, 0.7)
    compute, chunks = logprobs._entropies, []
    monkeypatch.setattr(logprobs, "_NO_GRAD_CHUNK_BYTES", 2 * 4 * 11)

    def counted(chunk, *args):
        chunks.append(tuple(chunk.shape[:-1]))
        return compute(chunk, *args)

    monkeypatch.setattr(logprobs, "_entropies", counted)
    chunked = token_entropies(logits, vocab_size=9, temperature=0.7)  # a strided view of the logits, no copy
    assert chunks == [(2,), (2,), (1,)] * 3
    torch.testing.assert_close(chunked[:, 1:], reference)
    torch.testing.assert_close(chunked[:, 1:], whole)  # row by row: the same sums, within fp32 rounding
    # With a gradient (the entropy bonus of the loss) the whole tensor at once, as autograd needs it.
    del chunks[:]
    token_entropies(logits.clone().requires_grad_(), vocab_size=9, temperature=0.7)
    assert chunks == [(3, 5)]
    with torch.no_grad():
        token_entropies(logits.clone().requires_grad_(), vocab_size=9, temperature=0.7)
    assert chunks == [(3, 5)] + [(2,), (2,), (1,)] * 3


def test_target_logprobs_leave_the_logits_alone_unless_allowed_to_overwrite(megatron_single_rank, logits_and_tokens):
    logits, tokens = logits_and_tokens
    expected = token_logprobs(logits, tokens)[:, 1:]
    predicting = logits[:, :-1].contiguous()
    kept = predicting.clone()
    torch.testing.assert_close(target_logprobs(predicting, tokens[:, 1:]), expected)
    assert torch.equal(predicting, kept)
    torch.testing.assert_close(target_logprobs(predicting, tokens[:, 1:], overwrite_logits=True), expected)
    assert not torch.equal(predicting, kept)


def test_logits_over_the_response_span_give_the_full_forward_pass_log_probs_and_gradients(megatron_single_rank):
    """The PPO update projects only the positions that predict response tokens; on the response the
    log-probs, entropies and parameter gradients equal those of the full forward pass."""
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.forward import logits_for_positions, position_ids_for
    from nemo_dvpo.utils.distributed import ParallelConfig
    from tests.distributed.common import megatron_from_hf, random_hf_model

    model_cfg = load_model_config("tiny")
    chunk = megatron_from_hf(model_cfg, random_hf_model(model_cfg), ParallelConfig())[0]
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    response_mask = torch.zeros(2, 12)
    response_mask[0, 5:11] = 1  # ends before the row does: right padding follows
    response_mask[1, 7:] = 1
    start, end = response_logit_span(response_mask)
    assert (start, end) == (4, 11)

    def masked_sum_and_grads(logprobs, entropies):
        chunk.zero_grad()
        ((logprobs + 0.1 * entropies) * response_mask).sum().backward()
        return {name: param.grad.clone() for name, param in chunk.named_parameters()}

    full = chunk(tokens, position_ids_for(tokens), attention_mask=None)
    expected = token_logprobs(full, tokens), token_entropies(full)
    expected_grads = masked_sum_and_grads(*expected)

    with logits_for_positions(chunk, start, end):
        span = chunk(tokens, position_ids_for(tokens), attention_mask=None)
    assert span.shape[:2] == (2, end - start)
    entropies = at_token_positions(predictive_entropies(span), start)
    logprobs = at_token_positions(target_logprobs(span, tokens[:, start + 1:], overwrite_logits=True), start)
    grads = masked_sum_and_grads(logprobs, entropies)

    on_response = response_mask.bool()
    torch.testing.assert_close(logprobs[on_response], expected[0][on_response], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies[on_response], expected[1][on_response], rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The hook is gone after the context: full-length logits again.
    assert chunk(tokens, position_ids_for(tokens), attention_mask=None).shape[1] == 12
