"""The GVM objective against values computed by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import pytest
import torch

from nemo_dvpo.algorithms.gvm import gvm_loss, lambda_returns, last_response_index, terminal_rewards

# Row 0: prompt at 0-1, response at 2-4, padding at 5. Row 1: prompt at 0-2, one-token response at 3.
# Values at prompt and padding positions are deliberately large: they must not leak into anything.
VALUES = torch.tensor([[9.0, 9.0, 0.5, 0.2, -0.1, 7.0],
                       [9.0, 9.0, 9.0, 0.3, 7.0, 7.0]])
RESPONSE_MASK = torch.tensor([[0, 0, 1, 1, 1, 0],
                              [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
LABELS = torch.tensor([1.0, -1.0])


def test_terminal_rewards_put_the_label_on_the_last_response_token():
    expected = torch.tensor([[0, 0, 0, 0, 1.0, 0], [0, 0, 0, -1.0, 0, 0]])
    assert torch.equal(terminal_rewards(LABELS, RESPONSE_MASK), expected)
    assert last_response_index(RESPONSE_MASK).tolist() == [4, 3]


def test_terminal_rewards_refuse_rows_without_a_response():
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        terminal_rewards(LABELS, torch.tensor([[0, 1], [0, 0]], dtype=torch.bool))


@pytest.mark.parametrize("gamma,lam,expected_row0", [
    # lam=0.95, gamma=1: A4 = 1 - (-0.1) = 1.1; A3 = (-0.1 - 0.2) + 0.95 * 1.1 = 0.745;
    # A2 = (0.2 - 0.5) + 0.95 * 0.745 = 0.40775; R = A + V.
    (1.0, 0.95, [0.90775, 0.945, 1.0]),
    # lam=1: Monte-Carlo, every response token regresses onto the label.
    (1.0, 1.0, [1.0, 1.0, 1.0]),
    # lam=0: TD(0), R_t = r_t + V(t+1).
    (1.0, 0.0, [0.2, -0.1, 1.0]),
    # gamma=0.9, lam=1: discounted Monte-Carlo, 0.9^2, 0.9, 1.
    (0.9, 1.0, [0.81, 0.9, 1.0]),
    # gamma=0.9, lam=0.95: A4 = 1.1; A3 = (0.9 * -0.1 - 0.2) + 0.855 * 1.1 = 0.6505;
    # A2 = (0.9 * 0.2 - 0.5) + 0.855 * 0.6505 = 0.2361775.
    (0.9, 0.95, [0.7361775, 0.8505, 1.0]),
])
def test_lambda_returns_by_hand(gamma, lam, expected_row0):
    returns = lambda_returns(VALUES, terminal_rewards(LABELS, RESPONSE_MASK), RESPONSE_MASK, gamma, lam)
    torch.testing.assert_close(returns[0, 2:5], torch.tensor(expected_row0), atol=1e-6, rtol=0)
    # A one-token response returns its label whatever gamma and lam are.
    torch.testing.assert_close(returns[1, 3], torch.tensor(-1.0))
    # Nothing outside the response.
    assert (returns[~RESPONSE_MASK] == 0).all()


def test_lambda_returns_ignore_padding_and_prompt_values():
    rewards = terminal_rewards(LABELS, RESPONSE_MASK)
    changed = VALUES.clone()
    changed[~RESPONSE_MASK] = -123.0
    torch.testing.assert_close(lambda_returns(changed, rewards, RESPONSE_MASK),
                               lambda_returns(VALUES, rewards, RESPONSE_MASK))


def test_lambda_returns_do_not_carry_gradient():
    values = VALUES.clone().requires_grad_(True)
    returns = lambda_returns(values, terminal_rewards(LABELS, RESPONSE_MASK), RESPONSE_MASK)
    assert not returns.requires_grad


def test_gvm_loss_by_hand():
    returns = lambda_returns(VALUES, terminal_rewards(LABELS, RESPONSE_MASK), RESPONSE_MASK, 1.0, 0.95)
    values = VALUES.clone().requires_grad_(True)
    loss = gvm_loss(values, returns, RESPONSE_MASK)
    # Errors: 0.5-0.90775, 0.2-0.945, -0.1-1.0, 0.3-(-1.0) -> squares 0.1662600625, 0.555025, 1.21, 1.69.
    # 0.5 * (3.6212850625 / 4) = 0.4526606328125
    torch.testing.assert_close(loss, torch.tensor(0.4526606328125), atol=1e-6, rtol=0)
    loss.backward()
    # d/dV of 0.5 * mean((V - R)^2) = (V - R) / N on response tokens, 0 elsewhere.
    expected_gradient = torch.zeros_like(VALUES)
    expected_gradient[RESPONSE_MASK] = (VALUES[RESPONSE_MASK] - returns[RESPONSE_MASK]) / 4
    torch.testing.assert_close(values.grad, expected_gradient)


def test_gvm_loss_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="no response tokens"):
        gvm_loss(VALUES, VALUES, torch.zeros_like(RESPONSE_MASK))


def test_sequence_summaries_and_pairwise_accuracy_by_hand():
    from nemo_dvpo.evaluation.value_accuracy import pairwise_accuracy, sequence_value_summaries

    values = torch.tensor([[5.0, 0.1, 0.3, 0.2, 9.0],
                           [5.0, 5.0, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    summaries = sequence_value_summaries(values, mask)
    torch.testing.assert_close(summaries["mean"], torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(summaries["last"], torch.tensor([0.2, 0.4]))
    # Linear interpolation at position q * (n - 1) of the sorted values [0.1, 0.2, 0.3]:
    # P99 at 1.98 -> 0.2 + 0.98 * 0.1 = 0.298; P1 at 0.02 -> 0.1 + 0.02 * 0.1 = 0.102.
    torch.testing.assert_close(summaries["p99"], torch.tensor([0.298, 0.4]))
    torch.testing.assert_close(summaries["p1"], torch.tensor([0.102, 0.4]))

    chosen = {"mean": torch.tensor([1.0, 0.0, 0.5]), "last": torch.tensor([0.0, 1.0, 1.0])}
    rejected = {"mean": torch.tensor([0.0, 0.5, 0.5]), "last": torch.tensor([1.0, 0.0, 0.0])}
    # Ties are not wins: mean wins 1 of 3, last wins 2 of 3.
    accuracy = pairwise_accuracy(chosen, rejected)
    assert accuracy["mean"] == pytest.approx(1 / 3) and accuracy["last"] == pytest.approx(2 / 3)


def test_wilson_interval_against_hand_computed_values():
    from nemo_dvpo.evaluation.value_accuracy import wilson_interval

    # z = 1.96, z^2 = 3.8416. 9 of 12: p = 0.75, 1 + z^2/n = 1.320133, centre = (0.75 + 0.160067) / 1.320133
    # = 0.689376, half-width = 1.96 / 1.320133 * sqrt(0.75 * 0.25 / 12 + 3.8416 / 576) = 0.221684.
    low, high = wilson_interval(9, 12)
    assert low == pytest.approx(0.467690, abs=2e-5) and high == pytest.approx(0.911060, abs=2e-5)
    # 0 of n: centre = half-width, so the interval is [0, z^2 / (n + z^2)] = [0, 3.8416 / 13.8416].
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=2e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.722460, 1.0), abs=2e-5)
    # 210 of 300 (70%): [0.646, 0.749], the width a 300-pair held-out set buys.
    low, high = wilson_interval(210, 300)
    assert low == pytest.approx(0.645881, abs=2e-5) and high == pytest.approx(0.749061, abs=2e-5)
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(5, 0)


def test_value_colours_and_html_rendering():
    from nemo_dvpo.evaluation.visualize import TokenValueRow, render_html, value_colour

    assert value_colour(0.0) == (255, 255, 255)
    assert value_colour(1.0) == (0, 255, 0) and value_colour(5.0) == (0, 255, 0)
    assert value_colour(-0.5) == (255, 128, 128)
    page = render_html([TokenValueRow("chosen", "Q?", ["A", "<b>"], [0.5, -1.0])], "t")
    # Token text is escaped: a token that looks like markup is shown, not interpreted.
    assert ">&lt;b&gt;</span>" in page and "<b>" not in page
    assert "title='+0.5000'" in page and "title='-1.0000'" in page
