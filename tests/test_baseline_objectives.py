"""The baselines' objectives against numbers worked out by hand: the reward model's Bradley-Terry loss, PPO's
rewards, GAE and clipped value loss, GRPO's group advantages, and DPO (also against transformers' log-probs)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_dvpo.algorithms.dpo import dpo_loss, sequence_logprobs
from nemo_dvpo.algorithms.grpo import group_advantages, token_advantages
from nemo_dvpo.algorithms.ppo import (explained_variance, gae, normalize_scores, ppo_rewards, state_values,
                                      value_loss)
from nemo_dvpo.algorithms.reward import bradley_terry_loss, pair_rows


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_loss_accuracy_and_margin_by_hand():
    result = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0]))
    expected = -(math.log(_sigmoid(1.5)) + math.log(_sigmoid(-1.0))) / 2
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.accuracy.item() == 0.5 and result.margin.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_pair_rows_match_chosen_with_rejected_and_refuse_split_pairs():
    chosen, rejected = pair_rows(torch.tensor([7, 7, 3, 3]), torch.tensor([False, True, True, False]))
    assert chosen.tolist() == [1, 2] and rejected.tolist() == [0, 3]
    with pytest.raises(ValueError, match="pair 3 is split across micro-batches"):
        pair_rows(torch.tensor([7, 7, 3]), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="needs pairwise records"):
        pair_rows(torch.tensor([-1, -1]), torch.tensor([False, False]))


def test_ppo_rewards_put_the_score_on_the_last_token_and_the_kl_everywhere():
    mask = torch.tensor([[False, True, True, True, False]])
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0]])
    rewards = ppo_rewards(torch.tensor([3.0]), logprobs, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) per response token; +3 on the last response token (position 3)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 3.0, 0.0]]))


def test_scores_are_whitened_over_the_batch_before_they_become_rewards():
    # mean 3; Bessel std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3) = 2.160247
    normalized = normalize_scores(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(normalized, torch.tensor([-0.925820, -0.462910, 0.0, 1.388730]))
    # Only differences between scores matter afterwards: a shift and a scale of the reward model change nothing.
    torch.testing.assert_close(normalize_scores(torch.tensor([1.0, 2.0, 3.0, 6.0]) * 0.01 - 5.0), normalized,
                               rtol=1e-4, atol=1e-4)  # float32 rounding of the shifted scores
    with pytest.raises(ValueError, match="at least 2"):
        normalize_scores(torch.tensor([0.7]))


def test_gae_advantages_and_returns_by_hand():
    # One row, response positions 1..3, gamma 0.5, lambda 0.5; state values V(s_1..s_3) = 1, 2, 3.
    mask = torch.tensor([[False, True, True, True]])
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0, 4.0]])
    # delta_3 = 4 - 3 = 1; delta_2 = 0 + 0.5*3 - 2 = -0.5; delta_1 = 1 + 0.5*2 - 1 = 1
    # A_3 = 1; A_2 = -0.5 + 0.25*1 = -0.25; A_1 = 1 + 0.25*(-0.25) = 0.9375; R = A + V
    result = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(result.returns, torch.tensor([[0.0, 1.9375, 1.75, 4.0]]))
    raw = torch.tensor([0.9375, -0.25, 1.0])
    whitened = (raw - raw.mean()) / (raw.std() + 1e-8)
    torch.testing.assert_close(result.advantages[0, 1:], whitened)
    assert result.advantages[0, 0] == 0


def test_state_values_are_the_values_of_the_position_before():
    torch.testing.assert_close(state_values(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[0.0, 1.0, 2.0]]))


def test_clipped_value_loss_takes_the_worse_of_the_clipped_and_plain_errors():
    mask = torch.tensor([[True, True]])
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, -1.0]])
    # token 1: plain (1-2)^2 = 1; clipped value 0.2 -> (0.2-2)^2 = 3.24 -> 3.24.  token 2: 1 and 1 -> 1
    assert value_loss(values, old, returns, mask, clip=0.2).item() == pytest.approx(0.5 * (3.24 + 1) / 2)
    assert value_loss(values, old, returns, mask, clip=None).item() == pytest.approx(0.5 * (1 + 1) / 2)
    # With a global token count of 4 the micro-batch's sum is divided by 4, not by its own 2 tokens.
    assert value_loss(values, old, returns, mask, clip=None, token_count=torch.tensor(4.0)).item() == \
        pytest.approx(0.5 * 2 / 4)


def test_explained_variance():
    mask = torch.tensor([[True, True, True, False]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


def test_grpo_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 0.0, 4.0, 4.0])
    advantages = group_advantages(scores, group_size=4, eps=0.0)
    first = torch.tensor([1.0, 3.0, 2.0, 2.0])
    second = torch.tensor([0.0, 0.0, 4.0, 4.0])
    torch.testing.assert_close(advantages[:4], (first - 2.0) / first.std())
    torch.testing.assert_close(advantages[4:], (second - 2.0) / second.std())
    mask = torch.tensor([[True, True, False]] * 8)
    assert token_advantages(advantages, mask)[1].tolist() == [advantages[1].item()] * 2 + [0.0]
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(scores, group_size=1)


def test_dpo_loss_by_hand():
    result = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5]),
                      beta=0.5)
    # beta * ((-10 + 11) - (-12 + 11.5)) = 0.5 * 1.5 = 0.75
    assert result.loss.item() == pytest.approx(-math.log(_sigmoid(0.75)), rel=1e-6)
    assert result.chosen_rewards.item() == pytest.approx(0.5) and result.rejected_rewards.item() == pytest.approx(-0.25)
    assert result.accuracy.item() == 1.0


def test_dpo_sequence_logprobs_equal_transformers(megatron_single_rank):
    """The summed response log-probs the DPO recipe feeds the loss, from Megatron, equal transformers' for the
    same weights; so does the loss."""
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.rlhf.rollout import token_logprobs
    from nemo_dvpo.utils.distributed import ParallelConfig
    from tests.distributed.common import megatron_from_hf, random_hf_model

    model_cfg = load_model_config("tiny")
    policy_hf, reference_hf = random_hf_model(model_cfg, seed=1), random_hf_model(model_cfg, seed=2)
    policy = megatron_from_hf(model_cfg, policy_hf, ParallelConfig())
    reference = megatron_from_hf(model_cfg, reference_hf, ParallelConfig())
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 5:12] = True

    def ours(model):
        return sequence_logprobs(token_logprobs(model, tokens, mask, vocab_size=model_cfg.vocab_size)[0], mask)

    def theirs(hf_model):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(tokens).logits.float(), dim=-1)
        per_token = logprobs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return (per_token * mask[:, 1:]).sum(dim=1)

    torch.testing.assert_close(ours(policy), theirs(policy_hf), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(reference), theirs(reference_hf), rtol=1e-4, atol=1e-4)
    loss = dpo_loss(ours(policy)[:1], ours(policy)[1:], ours(reference)[:1], ours(reference)[1:], beta=0.1).loss
    expected = dpo_loss(theirs(policy_hf)[:1], theirs(policy_hf)[1:], theirs(reference_hf)[:1],
                        theirs(reference_hf)[1:], beta=0.1).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
