"""Stage-2 objective (nemo_dvpo.algorithms.dvpo) against values computed by hand.

One row: a prompt token (position 0), three response tokens (1-3), then padding (4). Prompt and
padding carry large values that must never reach a statistic.
GVM values on the response: 1, 3, 2.5 -> mean 13/6, Bessel std 1.040833 ->
normalised -1.120897, 0.800641, 0.320256.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_dvpo.algorithms.dvpo import compute_advantages
from nemo_dvpo.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    masked_normalize,
    policy_loss,
    ppo_clip_loss,
)

RESPONSE_MASK = torch.tensor([[False, True, True, True, False]])
GVM_VALUES = torch.tensor([[50.0, 1.0, 3.0, 2.5, -40.0]])
NORMALIZED = [-1.12089707663561, 0.8006407690254359, 0.32025630761017443]
# log pi - log pi_ref on the response tokens (prompt/padding entries are junk that must be ignored).
LOGPROBS = torch.tensor([[-9.0, -1.0, -2.2, -0.7, -5.0]])
REF_LOGPROBS = torch.tensor([[3.0, -1.5, -2.0, -1.0, 7.0]])  # differences 0.5, -0.2, 0.3
KL_COEF = 0.1


def _response(x: torch.Tensor) -> list[float]:
    return x[RESPONSE_MASK].tolist()


def test_masked_normalize_uses_only_masked_positions():
    normalized = masked_normalize(GVM_VALUES, RESPONSE_MASK)
    assert _response(normalized) == pytest.approx(NORMALIZED, rel=1e-6)
    assert normalized[0, 0] == 0 and normalized[0, 4] == 0


def test_masked_normalize_without_shift_and_with_too_few_positions():
    scaled = masked_normalize(GVM_VALUES, RESPONSE_MASK, shift_mean=False)
    assert _response(scaled) == pytest.approx([v / 1.0408329997330663 for v in (1.0, 3.0, 2.5)], rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        masked_normalize(GVM_VALUES, torch.tensor([[False, True, False, False, False]]))


def test_value_mode_advantage_is_the_batch_normalised_gvm_value():
    result = compute_advantages(GVM_VALUES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, mode="value", kl_coef=KL_COEF)
    assert _response(result.advantages) == pytest.approx(NORMALIZED, rel=1e-6)
    assert torch.count_nonzero(result.kl_rewards) == 0
    assert result.advantages[~RESPONSE_MASK].abs().max() == 0


def test_value_mode_across_a_padded_batch_normalises_over_all_rows():
    gvm_values = torch.tensor([[7.0, 1.0, 3.0, 0.0], [7.0, 7.0, 2.5, 9.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, False]])
    advantages = compute_advantages(gvm_values, gvm_values, gvm_values, mask, mode="value").advantages
    assert advantages[mask].tolist() == pytest.approx(NORMALIZED, rel=1e-6)


def test_value_mode_with_stored_gvm_statistics():
    result = compute_advantages(GVM_VALUES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, value_stats=(2.0, 0.5))
    assert _response(result.advantages) == pytest.approx([-2.0, 2.0, 1.0], rel=1e-6)


# Mode "gae" bootstraps from state values, the GVM's values one position earlier: 50 (the last prompt
# token, before the first response token), 1, 3 -> mean 18, Bessel std sqrt(769) -> normalised
# 1.153950, -0.613036, -0.540914.
STATE_NORMALIZED = [1.1539495135593902, -0.613035679078426, -0.5409138344809642]


@pytest.mark.parametrize("gamma, lam, raw_gae, whitened", [
    # delta_t = r_t + gamma V'(s_{t+1}) - V'(s_t), r = -0.1 * (0.5, -0.2, 0.3), V'(s_4) = 0;
    # A_t = delta_t + gamma lam A_{t+1}. gamma 1, lam 0.5:
    #   A_3 = -0.03 + 0.540914 = 0.510914;  A_2 = 0.02 - 0.540914 + 0.613036 + 0.5 A_3 = 0.347579
    #   A_1 = -0.05 - 0.613036 - 1.153950 + 0.5 A_2 = -1.643196
    (1.0, 0.5, [-1.6431958117188443, 0.34757876183794395, 0.5109138344809642],
     [-1.1520202560245227, 0.5079146268253623, 0.6441056291991604]),
    (0.9, 0.95, [-1.2571785288995745, 0.5830445565267826, 0.5109138344809642],
     [-1.1540090228684718, 0.6116077100380675, 0.5424013128304045]),
])
def test_gae_mode_matches_hand_computed_advantages(gamma, lam, raw_gae, whitened):
    result = compute_advantages(GVM_VALUES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, mode="gae",
                                kl_coef=KL_COEF, gamma=gamma, lam=lam)
    assert _response(result.kl_rewards) == pytest.approx([-0.05, 0.02, -0.03], rel=1e-5)
    assert _response(result.normalized_values) == pytest.approx(STATE_NORMALIZED, rel=1e-6)
    assert _response(result.advantages) == pytest.approx(whitened, rel=1e-5)
    mean = sum(raw_gae) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in raw_gae) / 2)
    assert [(a - mean) / std for a in raw_gae] == pytest.approx(whitened, rel=1e-6)
    assert result.advantages[~RESPONSE_MASK].abs().max() == 0


def test_gae_mode_credits_the_token_after_which_the_gvm_value_rises():
    """A token the GVM rates highly (its value jumps at that token) gets the larger advantage, no KL."""
    mask = torch.tensor([[False, True, True, True, True]])
    values = torch.tensor([[0.0, 0.0, 2.0, 2.0, 2.0]])  # token 2 raises the value
    zeros = torch.zeros(1, 5)
    advantages = compute_advantages(values, zeros, zeros, mask, mode="gae", gamma=1.0, lam=0.0).advantages
    assert advantages[0, 2] == advantages[0, 1:].max()
    assert advantages[0, 2] > 0


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="advantage mode"):
        compute_advantages(GVM_VALUES, LOGPROBS, REF_LOGPROBS, RESPONSE_MASK, mode="critic")


def test_kl_estimators():
    log_ratio = torch.tensor([0.5, -0.2])
    logprobs, ref = log_ratio, torch.zeros(2)
    assert kl_estimate(logprobs, ref, "k1").tolist() == pytest.approx([0.5, -0.2])
    assert kl_estimate(logprobs, ref, "k2").tolist() == pytest.approx([0.125, 0.02])
    assert kl_estimate(logprobs, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) + 0.5 - 1, math.exp(0.2) - 0.2 - 1])


# ratios 1.5, 0.5, 1.1 with advantages 1, -1, 2 and clip 0.2:
#   t1: max(-1.5, -1.2) = -1.2 (clipped)   t2: max(0.5, 0.8) = 0.8 (clipped)   t3: max(-2.2, -2.2) = -2.2
PPO_MASK = torch.tensor([[True, True, True, False]])
PPO_OLD = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
PPO_NEW = PPO_OLD + torch.log(torch.tensor([[1.5, 0.5, 1.1, 100.0]]))
PPO_ADV = torch.tensor([[1.0, -1.0, 2.0, 1000.0]])


def test_ppo_clip_loss_value_and_statistics():
    loss, stats = ppo_clip_loss(PPO_NEW, PPO_OLD, PPO_ADV, PPO_MASK, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(2 / 3)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert stats.approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert stats.ratio_mean.item() == pytest.approx(3.1 / 3, rel=1e-6)


def test_ppo_clip_loss_gradient_flows_only_through_unclipped_tokens():
    logprobs = PPO_NEW.clone().requires_grad_()
    loss, _ = ppo_clip_loss(logprobs, PPO_OLD, PPO_ADV, PPO_MASK, clip=0.2)
    loss.backward()
    # d/dlogp of -A * rho = -A * rho / n_tokens on the unclipped token; 0 on clipped and padding.
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.0, -2.0 * 1.1 / 3, 0.0], abs=1e-6)


def test_ppo_loss_is_zero_gradient_free_at_ratio_one_with_zero_mean_advantages():
    advantages = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    loss, stats = ppo_clip_loss(PPO_OLD, PPO_OLD, advantages, PPO_MASK)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert stats.clip_fraction.item() == 0 and stats.approx_kl.item() == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_adds_the_kl_term_and_the_entropy_bonus():
    ref = PPO_OLD - 0.3
    entropy = torch.tensor([[2.0, 1.0, 3.0, 50.0]])
    plain = policy_loss(PPO_NEW, PPO_OLD, ref, PPO_ADV, PPO_MASK, clip=0.2)
    full = policy_loss(PPO_NEW, PPO_OLD, ref, PPO_ADV, PPO_MASK, clip=0.2, kl_loss_coef=0.5,
                       entropy=entropy, entropy_coef=0.01)
    log_ratios = [math.log(r) + 0.3 for r in (1.5, 0.5, 1.1)]
    expected_kl = sum(math.exp(-x) + x - 1 for x in log_ratios) / 3
    assert full.kl_loss.item() == pytest.approx(expected_kl, rel=1e-5)
    assert full.entropy.item() == pytest.approx(2.0)
    assert full.loss.item() == pytest.approx(plain.loss.item() + 0.5 * expected_kl - 0.01 * 2.0, rel=1e-5)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(PPO_NEW, PPO_OLD, ref, PPO_ADV, PPO_MASK, entropy_coef=0.1)


def test_adaptive_kl_controller_follows_ziegler_update_and_round_trips():
    controller = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=8)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000))
    controller.update(current_kl=4.5, n_steps=8)  # error -0.25 clipped to -0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000) * (1 - 0.2 * 8 / 10000))
    restored = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
