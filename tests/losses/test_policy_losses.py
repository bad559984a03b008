"""Policy-gradient math against hand-computed values (nemo_aligner.losses.policy)."""

import math
import statistics

import pytest
import torch

from nemo_aligner.losses import policy as P

D = dict(dtype=torch.float64)


def t(x):
    return torch.tensor(x, **D)


def test_masked_mean_and_var():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [0, 1, 0]])
    assert P.masked_mean(values, mask).item() == pytest.approx(8 / 3)
    assert P.masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.5, 5.0])
    # An empty row gives 0, not NaN.
    assert P.masked_mean(values, t([[0, 0, 0], [1, 0, 0]]), dim=-1).tolist() == [0.0, 4.0]
    mean, var = P.masked_mean_var(values, mask)
    assert mean.item() == pytest.approx(8 / 3)
    assert var.item() == pytest.approx(26 / 9)  # population variance of 1, 2, 5
    white = P.masked_whiten(values, mask)
    assert white[0, 0].item() == pytest.approx((1 - 8 / 3) / math.sqrt(26 / 9 + 1e-8))
    assert P.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-12)
    given = P.masked_whiten(values, mask, mean=t(1.0), var=t(4.0), eps=0.0)
    assert given[1, 1].item() == pytest.approx(2.0)


def test_aggregate_token_and_sequence_level():
    loss = t([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    total, count = P.aggregate_loss(loss, mask, token_level=True)
    assert (total.item(), count.item()) == (6.0, 3.0)  # mean 2 over the three tokens
    total, count = P.aggregate_loss(loss, mask, token_level=False)
    assert (total.item(), count.item()) == (4.0, 2.0)  # mean of the sequence means 2 and 2; the empty one is skipped


def test_kl_estimators_hand_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    logr = math.log(0.5)
    assert P.kl_estimate(logp, ref, "k1").item() == pytest.approx(-logr)
    assert P.kl_estimate(logp, ref, "k2").item() == pytest.approx(logr**2 / 2)
    assert P.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - logr)
    with pytest.raises(ValueError, match="kl_type"):
        P.kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_at_extreme_ratios(kind):
    logp = t([0.0, 0.0, -30.0, 0.0])
    ref = t([-50.0, -5.0, 0.0, -1e-9])
    out = P.kl_estimate(logp, ref, kind).tolist()
    # logr = -50 -> clamped to -20 on input, then the estimate is clamped to +-10 on output.
    expected_first = {"k1": 10.0, "k2": 10.0, "k3": 10.0}[kind]
    assert out[0] == expected_first
    # logr = -5 stays inside the input clamp; only k2 = 12.5 meets the output clamp.
    assert out[1] == pytest.approx({"k1": 5.0, "k2": 10.0, "k3": math.exp(-5) - 1 + 5}[kind])
    # logr = +30 -> 20 on input: k1 = -20 -> -10; k2, k3 -> 10.
    assert out[2] == {"k1": -10.0, "k2": 10.0, "k3": 10.0}[kind]
    assert all(math.isfinite(v) for v in out)
    # Without clamps the estimators are the raw formulas.
    raw = P.kl_estimate(logp, ref, kind, input_clamp=None, output_clamp=None).tolist()
    logr = [-50.0, -5.0, 30.0, -1e-9]
    formula = {"k1": lambda r: -r, "k2": lambda r: r * r / 2, "k3": lambda r: math.exp(r) - 1 - r}[kind]
    assert raw == pytest.approx([formula(r) for r in logr], rel=1e-12)


def test_sequence_kl_penalty_absolute_and_signed():
    logp = t([[-1.0, -2.0, -3.0]])
    init = t([[-2.0, -1.0, -9.0]])
    mask = t([[1, 1, 0]])
    assert P.sequence_kl_penalty(logp, init, mask, use_absolute_kl=True).tolist() == [1.0]
    assert P.sequence_kl_penalty(logp, init, mask, use_absolute_kl=False).tolist() == [0.0]


def test_rloo_baseline_with_samples_that_did_not_end():
    rewards = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 1])
    # Group 0: valid rewards 1, 2, 4 (M = 3, sum 7); every sample divides by M - 1 = 2.
    # Group 1: one valid sample -> baseline = reward. Group 2: a single sample -> the same.
    expected = [6 / 2, 5 / 2, 7 / 2, 3 / 2, 5.0, 6.0, 7.0]
    assert P.rloo_baseline(rewards, groups, valid).tolist() == pytest.approx(expected)


def _loo_reference(rewards, normalize, leave_one_out):
    """Independent per-sample computation with the statistics module."""
    out = []
    for i, r in enumerate(rewards):
        others = [x for j, x in enumerate(rewards) if j != i] if leave_one_out else list(rewards)
        b = statistics.fmean(others)
        s = statistics.stdev(others) if len(others) > 1 else 0.0
        out.append((r - b) / (s + 1e-6) if normalize and s > 0 else r - b)
    return out


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_group_advantages_hand_values(leave_one_out, normalize):
    groups = {0: [0.0, 1.0, 2.0, 3.0], 1: [1.0, 1.0, 1.0], 2: [0.5, 2.0], 3: [1.0, 1.0, 0.0, 1.0]}
    rewards = t([r for g in groups.values() for r in g])
    ids = torch.tensor([k for k, g in groups.items() for _ in g])
    got = P.group_advantages(rewards, ids, leave_one_out=leave_one_out, normalize=normalize).tolist()
    expected = [a for g in groups.values() for a in _loo_reference(g, normalize, leave_one_out)]
    assert got == pytest.approx(expected, abs=1e-12)
    # Ties: every advantage of the all-equal group is exactly 0 (its std is 0, not divided).
    assert got[4:7] == [0.0, 0.0, 0.0]
    if leave_one_out:
        # A pair: each compares with the other one alone (std 0), so A = r - other.
        assert got[7:9] == pytest.approx([-1.5, 1.5])
        # The sample with reward 0 is compared with three tied rewards (std 0): A = 0 - 1.
        assert got[11] == pytest.approx(-1.0)


def test_group_advantages_invalid_samples_and_singletons():
    rewards = t([1.0, 5.0, 3.0, 9.0, 2.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    valid = torch.tensor([1, 0, 1, 1, 0])
    got = P.group_advantages(rewards, ids, valid=valid).tolist()
    # Group 0 over its valid samples 1 and 3 (leave-one-out: each against the other).
    assert got == pytest.approx([1.0 - 3.0, 0.0, 3.0 - 1.0, 0.0, 0.0])


def test_clipped_surrogate_both_sides():
    logp = t([math.log(1.5)] * 2 + [math.log(0.5)] * 2)
    old = torch.zeros(4, **D)
    adv = t([1.0, -1.0, 1.0, -1.0])
    loss, ratio, clamped = P.clipped_surrogate(logp, old, adv, eps_low=0.2)
    # r = 1.5: A > 0 is clipped to 1.2, A < 0 keeps the unclipped (larger) loss.
    # r = 0.5: A > 0 keeps -0.5, A < 0 is clipped to 0.8.
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert ratio.tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5])
    assert clamped.tolist() == pytest.approx([1.2, 1.2, 0.8, 0.8])
    # Asymmetric clip (DAPO's clip-higher).
    loss, _, _ = P.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8])
    # Dual clip: a huge ratio with a negative advantage is capped at -A c.
    loss, _, _ = P.clipped_surrogate(t([math.log(5.0), math.log(5.0)]), torch.zeros(2, **D), t([-1.0, 1.0]),
                                     eps_low=0.2, dual_clip=3.0)
    assert loss.tolist() == pytest.approx([3.0, -1.2])
    with pytest.raises(ValueError, match="dual clip"):
        P.clipped_surrogate(logp, old, adv, eps_low=0.2, dual_clip=1.0)


def test_reinforce_loss():
    assert P.reinforce_loss(t([-1.0, -2.0]), t([0.5, -1.0])).tolist() == [0.5, -2.0]


def test_gae_hand_values_with_ragged_mask():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    gamma, lam = 0.9, 0.5
    adv, ret = P.gae(rewards, values, mask, gamma, lam)
    # Row 0: δ2 = 1 - .5 = .5; δ1 = 0 + .9*.5 - .5 = -.05; δ0 = -.05.
    a2 = 0.5
    a1 = -0.05 + gamma * lam * a2
    a0 = -0.05 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    # Row 1: the masked position has r = V = 0, so δ2 = 0; δ1 = 2 + 0 - 1 = 1; δ0 = 0 + .9 - 1.
    b1 = 1.0
    b0 = -0.1 + gamma * lam * b1
    assert adv[1].tolist() == pytest.approx([b0, b1, 0.0])
    assert torch.allclose(ret, adv + values * mask)


def test_gradcheck_float64():
    torch.manual_seed(0)
    logp = (torch.randn(3, 5, **D) * 0.3 - 1).requires_grad_()
    old = torch.randn(3, 5, **D) * 0.3 - 1
    ref = torch.randn(3, 5, **D) * 0.3 - 1
    adv = torch.randn(3, 5, **D)
    mask = (torch.rand(3, 5) > 0.3).to(torch.float64)

    def surrogate(x):
        return P.aggregate_loss(P.clipped_surrogate(x, old, adv, 0.2, 0.3, dual_clip=3.0)[0], mask, True)[0]

    assert torch.autograd.gradcheck(surrogate, (logp,))
    for kind in P.KL_TYPES:
        assert torch.autograd.gradcheck(lambda x, k=kind: P.kl_estimate(x, ref, k), (logp,))
    assert torch.autograd.gradcheck(lambda x: P.masked_whiten(x, mask), (logp,))
    assert torch.autograd.gradcheck(lambda x: P.sequence_kl_penalty(x, ref, mask, False), (logp,))
    rewards = torch.randn(8, **D).requires_grad_()
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda r: P.group_advantages(r, ids), (rewards,))
    values = torch.randn(3, 5, **D).requires_grad_()
    assert torch.autograd.gradcheck(lambda r, v: P.gae(r, v, mask, 0.95, 0.9)[0], (adv.clone().requires_grad_(), values))


def test_group_advantages_exact_zero_std_for_tied_inexact_rewards():
    # 0.1 is inexact in binary: a std from rounded means would be ~1e-17 and the division
    # would turn the lone 1.1 into an advantage of ~1e6.
    rewards = t([1.1] + [0.1] * 7)
    adv = P.group_advantages(rewards, torch.zeros(8, dtype=torch.long))
    assert adv[0].item() == pytest.approx(1.0)  # compared with seven tied 0.1s: std 0, A = r - b
    assert adv.abs().max().item() < 2.0
