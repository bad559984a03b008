"""Reward-model losses against hand-computed values, and gradcheck in float64."""

import math
import random

import pytest
import torch

from nemo_aligner.losses.reward import (
    MISSING_LABEL,
    bradley_terry_loss,
    margin_bt_loss,
    pairwise_reward_loss,
    regression_loss,
    scaled_bt_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def case(seed, scale):
    rng = random.Random(seed)
    rc = [rng.uniform(-scale, scale) for _ in range(7)]
    rr = [rng.uniform(-scale, scale) for _ in range(7)]
    m = [float(rng.randint(1, 3)) for _ in range(7)]
    return rc, rr, m


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 10.0), (2, 500.0)])
def test_pairwise_losses_match_hand_computation(seed, scale):
    rc, rr, m = case(seed, scale)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    bt = [-log_sigmoid(a - b) for a, b in zip(rc, rr)]
    margin = [-log_sigmoid(a - b - k) for a, b, k in zip(rc, rr, m)]
    scaled = [-k * log_sigmoid(a - b) for a, b, k in zip(rc, rr, m)]
    torch.testing.assert_close(bradley_terry_loss(t(rc), t(rr)), t(bt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(margin_bt_loss(t(rc), t(rr), t(m)), t(margin), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scaled_bt_loss(t(rc), t(rr), t(m)), t(scaled), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairwise_reward_loss("scaled_bt", t(rc), t(rr), t(m)), t(scaled))
    torch.testing.assert_close(pairwise_reward_loss("bt", t(rc), t(rr)), t(bt))


def test_bradley_terry_known_values():
    loss = bradley_terry_loss(torch.tensor([0.0, 1e4, -1e4]), torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log(2), 0.0, 1e4]))


@pytest.mark.parametrize("name", ["bt", "margin_bt", "scaled_bt"])
def test_pairwise_gradcheck(name):
    g = torch.Generator().manual_seed(1)
    rc = (torch.randn(5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    m = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_reward_loss(name, a, b, m), (rc, rr))


def test_margin_required():
    with pytest.raises(ValueError, match="margin"):
        pairwise_reward_loss("margin_bt", torch.zeros(2), torch.zeros(2))


def test_regression_loss_by_hand_with_missing_labels():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([[1.5, MISSING_LABEL, 0.0], [MISSING_LABEL, MISSING_LABEL, 4.0]], dtype=torch.float64)
    sse, n = regression_loss(pred, labels)
    torch.testing.assert_close(sse, torch.tensor([0.25 + 9.0, 0.0], dtype=torch.float64))
    assert n.tolist() == [2, 1]


def test_regression_gradcheck_ignores_missing():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randn(4, 3, generator=g, dtype=torch.float64)
    labels[0, 1] = labels[2, 0] = MISSING_LABEL
    assert torch.autograd.gradcheck(lambda p: regression_loss(p, labels)[0], (pred,))
    regression_loss(pred, labels)[0].sum().backward()
    assert pred.grad[0, 1] == 0 and pred.grad[2, 0] == 0
