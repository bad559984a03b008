"""Every preference loss against values computed by hand (plain Python floats), including
extreme margins, and its gradient against finite differences (gradcheck, float64)."""

import math
import random

import pytest
import torch

from nemo_aligner.losses.preference import (
    PAIRED_LOSSES,
    kto_kl_estimate,
    kto_loss,
    preference_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def by_hand(loss_type, pc, pr, rc, rr, beta, gc, gr, eta, eps=0.0, gamma=0.0):
    h = (pc - pr) - (rc - rr)
    m = beta * h
    g = eta * (gc - gr)
    if loss_type == "dpo":
        return -(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - m)
    if loss_type == "simpo":
        return -log_sigmoid(beta * (pc - pr) - gamma)
    if loss_type == "rpo_sq":
        return (m - g) ** 2
    # NeMo-Aligner's definitions, as written there: rpo_bwd_kl is KL(target || model),
    # rpo_fwd_kl is KL(model || target), with target σ(g) and model σ(m).
    sig = sigmoid
    if loss_type == "rpo_bwd_kl":
        return sig(g) * (log_sigmoid(g) - log_sigmoid(m)) + sig(-g) * (log_sigmoid(-g) - log_sigmoid(-m))
    if loss_type == "rpo_fwd_kl":
        return sig(m) * (log_sigmoid(m) - log_sigmoid(g)) + sig(-m) * (log_sigmoid(-m) - log_sigmoid(-g))
    if loss_type == "scale":
        return abs(gc - gr) * -log_sigmoid(m)
    raise AssertionError(loss_type)


def random_case(seed, scale):
    rng = random.Random(seed)
    n = 6
    cols = [[rng.uniform(-scale, 0) for _ in range(n)] for _ in range(4)]
    gt = [[rng.uniform(-5, 5) for _ in range(n)] for _ in range(2)]
    return cols, gt


# scale 400 puts implicit margins far in the tails (|β h| up to ~80 for β = 0.1, more for β = 2)
@pytest.mark.parametrize("loss_type", PAIRED_LOSSES)
@pytest.mark.parametrize("seed,scale,beta", [(0, 30.0, 0.1), (1, 80.0, 0.5), (2, 400.0, 2.0), (3, 400.0, 0.05)])
def test_paired_loss_matches_hand_computation(loss_type, seed, scale, beta):
    (pc, pr, rc, rr), (gc, gr) = random_case(seed, scale)
    eta, eps, gamma = 0.7, (0.1 if seed == 1 else 0.0), 0.5
    got = preference_loss(
        *(torch.tensor(c, dtype=torch.float64) for c in (pc, pr, rc, rr)),
        loss_type=loss_type, beta=beta,
        chosen_gt_rewards=torch.tensor(gc, dtype=torch.float64),
        rejected_gt_rewards=torch.tensor(gr, dtype=torch.float64),
        gt_reward_scale=eta, label_smoothing=eps, simpo_gamma=gamma,
    )
    want = [by_hand(loss_type, *vals, beta, a, b, eta, eps, gamma) for *vals, a, b in zip(pc, pr, rc, rr, gc, gr)]
    assert got.shape == (6,)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_rpo_kl_names_follow_nemo_aligner():
    """Model σ(m) = 0.5 (no margin), target σ(g) = 0.75 (g = ln 3): the two directions differ."""
    zero = torch.zeros(1, dtype=torch.float64)
    kw = dict(beta=1.0, chosen_gt_rewards=torch.tensor([math.log(3.0)], dtype=torch.float64),
              rejected_gt_rewards=zero.clone())
    bwd = preference_loss(zero, zero, zero, zero, loss_type="rpo_bwd_kl", **kw).item()
    fwd = preference_loss(zero, zero, zero, zero, loss_type="rpo_fwd_kl", **kw).item()
    assert bwd == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))  # KL(target || model)
    assert fwd == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))  # KL(model || target)
    scale = preference_loss(zero, zero, zero, zero, loss_type="scale", **kw).item()
    assert scale == pytest.approx(math.log(3.0) * math.log(2.0))  # |Δr*| · DPO at m = 0


@pytest.mark.parametrize("loss_type", ["dpo", "rpo_fwd_kl", "rpo_bwd_kl", "scale", "simpo"])
def test_extreme_margins_stay_finite_in_float32(loss_type):
    """Margins of ±1e4 (float32): no inf/nan in the loss or its gradient."""
    pc = torch.tensor([0.0, -1e5, 0.0], requires_grad=True)
    pr = torch.tensor([-1e5, 0.0, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    loss = preference_loss(pc, pr, zeros, zeros, loss_type=loss_type, beta=0.1,
                           chosen_gt_rewards=torch.tensor([3.0, -3.0, 0.0]), rejected_gt_rewards=zeros)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if loss_type == "dpo":  # a confidently right pair costs ~0, a confidently wrong one ~|m|
        assert loss[0].item() == pytest.approx(0.0, abs=1e-6)
        assert loss[1].item() == pytest.approx(1e4, rel=1e-6)


def test_dpo_at_policy_equals_reference_is_log_2():
    x = torch.randn(5, dtype=torch.float64) * 20
    y = torch.randn(5, dtype=torch.float64) * 20
    loss = preference_loss(x, y, x.clone(), y.clone(), loss_type="dpo", beta=0.3)
    torch.testing.assert_close(loss, torch.full((5,), math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("loss_type", PAIRED_LOSSES)
def test_paired_loss_gradcheck(loss_type):
    g = torch.Generator().manual_seed(7)
    # Moderate values: hinge's kink at m = 1 is avoided with probability one.
    args = [(torch.randn(5, generator=g, dtype=torch.float64) * 8).requires_grad_(True) for _ in range(4)]
    gt = [torch.randn(5, generator=g, dtype=torch.float64) * 2 for _ in range(2)]

    def f(pc, pr, rc, rr):
        return preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.4, chosen_gt_rewards=gt[0],
                               rejected_gt_rewards=gt[1], gt_reward_scale=1.3, simpo_gamma=0.2)

    assert torch.autograd.gradcheck(f, args)


def test_dpo_label_smoothing_gradcheck():
    g = torch.Generator().manual_seed(8)
    args = [(torch.randn(4, generator=g, dtype=torch.float64) * 5).requires_grad_(True) for _ in range(4)]
    assert torch.autograd.gradcheck(
        lambda *a: preference_loss(*a, loss_type="dpo", beta=0.2, label_smoothing=0.2), args
    )


def test_rpo_losses_need_gt_rewards_and_unknown_type_is_rejected():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="gt_rewards"):
        preference_loss(x, x, x, x, loss_type="rpo_sq", beta=0.1)
    with pytest.raises(ValueError, match="unknown"):
        preference_loss(x, x, x, x, loss_type="nope", beta=0.1)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, x, None, None, loss_type="dpo", beta=0.1)


# ---- KTO ---------------------------------------------------------------------------------

def kto_by_hand(p, r, desirable, z0, beta, wd, wu):
    z = beta * (p - r - z0)
    return wd * (1 - sigmoid(z)) if desirable else wu * (1 - sigmoid(-z))


@pytest.mark.parametrize("seed,scale", [(0, 10.0), (1, 300.0)])
def test_kto_matches_hand_computation(seed, scale):
    rng = random.Random(seed)
    n = 8
    p = [rng.uniform(-scale, 0) for _ in range(n)]
    r = [rng.uniform(-scale, 0) for _ in range(n)]
    kl_p = [rng.uniform(-scale, 0) for _ in range(n)]
    kl_r = [rng.uniform(-scale, 0) for _ in range(n)]
    desirable = [i % 3 != 0 for i in range(n)]
    weights = [1.0] * (n - 1) + [0.0]  # the last sample is padding: no say in the estimate
    kl_mean = sum((a - b) * w for a, b, w in zip(kl_p, kl_r, weights)) / sum(weights)
    z0 = max(0.0, kl_mean)
    beta, wd, wu = 0.1, 1.0, 1.33

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    est = kto_kl_estimate(t(kl_p), t(kl_r), t(weights))
    assert est.item() == pytest.approx(z0, abs=1e-12)
    got = kto_loss(t(p), t(r), torch.tensor(desirable), est, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want = [kto_by_hand(a, b, d, z0, beta, wd, wu) for a, b, d in zip(p, r, desirable)]
    torch.testing.assert_close(got, t(want), rtol=1e-10, atol=1e-12)


def test_kto_kl_estimate_is_clamped_and_detached():
    p = torch.tensor([-5.0, -6.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    est = kto_kl_estimate(p, r)
    assert est.item() == 0.0 and not est.requires_grad
    est = kto_kl_estimate(r, p.detach())  # positive mean: kept
    assert est.item() == pytest.approx(4.5)


def test_kto_gradcheck():
    g = torch.Generator().manual_seed(3)
    p = (torch.randn(6, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    r = (torch.randn(6, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    z0 = torch.tensor(0.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: kto_loss(a, b, desirable, z0, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5), (p, r)
    )
