"""PPO's math against hand-computed values (NeMo-Aligner's definitions): the per-token reward
with the KL penalty, GAE over ragged masks, whitening across two data-parallel ranks, the
clipped policy loss with the entropy bonus, and the clipped value loss; plus gradcheck."""

import sys
from pathlib import Path

import pytest
import torch

from nemo_aligner.losses import policy as P

WORKER = Path(__file__).resolve().parents[1] / "distributed" / "workers" / "whiten_worker.py"

D = dict(dtype=torch.float64)


def t(x):
    return torch.tensor(x, **D)


def test_kl_penalty_signed_and_absolute():
    logp, init = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    assert P.kl_penalty(logp, init, use_absolute_kl=False).tolist() == [[0.5, -1.0]]
    assert P.kl_penalty(logp, init, use_absolute_kl=True).tolist() == [[0.5, 1.0]]


def test_ppo_token_rewards_put_the_reward_on_the_last_response_position():
    mask = t([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    kl = t([[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
    out = P.ppo_token_rewards(t([2.0, -1.0, 7.0]), mask, kl, penalty=0.5)
    assert out[0].tolist() == pytest.approx([-0.05, -0.1, -0.15, 2.0 - 0.2, -0.25])
    assert out[1].tolist() == pytest.approx([-0.05, -0.1, -1.0 - 0.15, -0.2, -0.25])
    assert out[2, 0] == pytest.approx(7.0 - 0.05)  # an empty row: position 0, like clamp(min=0)
    assert P.ppo_token_rewards(t([2.0]), mask[:1]).tolist() == [[0, 0, 0, 2.0, 0]]


def test_gae_with_discount_lambda_and_prompt_offsets():
    # Responses start after the prompt: the mask is 0 on the first positions.
    rewards = t([[9.0, 0.0, 1.0, 0.0], [9.0, 9.0, 0.5, 2.0]])
    values = t([[5.0, 0.2, 0.4, 7.0], [5.0, 5.0, 1.0, 0.5]])
    mask = t([[0, 1, 1, 0], [0, 0, 1, 1]])
    g, lam = 0.8, 0.6
    adv, ret = P.gae(rewards, values, mask, g, lam)
    # Row 0: position 3 masked (r = V = 0). δ2 = 1 - .4; δ1 = 0 + .8*.4 - .2; δ0 = 0 + .8*.2 - 0.
    a2 = 0.6
    a1 = 0.12 + g * lam * a2
    a0 = 0.16 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    # Row 1: δ3 = 2 - .5; δ2 = .5 + .8*.5 - 1; δ1 = 0 + .8*1 - 0; δ0 = 0.
    b3 = 1.5
    b2 = -0.1 + g * lam * b3
    b1 = 0.8 + g * lam * b2
    b0 = g * lam * b1
    assert adv[1].tolist() == pytest.approx([b0, b1, b2, b3])
    assert torch.allclose(ret, adv + values * mask)


def test_whitening_hand_values():
    x, m = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    mean, var = P.masked_mean_var(x, m)
    assert (float(mean), float(var)) == pytest.approx((2.0, 2.0 / 3.0))
    w = P.masked_whiten(x, m)
    assert w[:3].tolist() == pytest.approx([(v - 2.0) / (2.0 / 3.0 + 1e-8) ** 0.5 for v in (1.0, 2.0, 3.0)])


@pytest.mark.slow
def test_whitening_across_two_data_parallel_ranks_equals_whitening_everything(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from helpers import run
    from whiten_worker import data

    run(WORKER, [str(tmp_path / "dp2")], nproc=2)
    values, mask = data()
    mean, var = P.masked_mean_var(values, mask)
    whole = P.masked_whiten(values, mask)
    parts = [torch.load(tmp_path / f"dp2.{r}.pt", weights_only=True) for r in range(2)]
    for part in parts:
        assert float(part["mean"]) == pytest.approx(float(mean), abs=1e-12)
        assert float(part["var"]) == pytest.approx(float(var), abs=1e-12)
    both = torch.cat([p["whitened"] for p in parts])
    assert torch.allclose(both * mask, whole * mask, atol=1e-12)


def test_clipped_policy_loss_with_entropy_bonus_masked_by_is_end():
    logp, old = t([[-1.0, -0.5], [-2.0, -1.0]]), t([[-1.5, -0.5], [-1.0, -1.0]])
    adv = t([[1.0, -2.0], [3.0, 1.0]])
    entropy = t([[0.7, 0.1], [2.0, 2.0]])
    mask, is_end = t([[1, 1], [1, 1]]), t([1.0, 0.0])
    loss, ratio, clamped = P.clipped_surrogate(logp, old, adv, 0.2)
    # r = e^{0.5} = 1.6487 (A=1 -> clipped at 1.2: max(-1.6487, -1.2) = -1.2); r = 1 (A=-2 -> 2)
    assert loss[0].tolist() == pytest.approx([-1.2, 2.0])
    end_mask = mask * is_end.unsqueeze(1)
    bonus = 0.01
    total = P.masked_mean(loss - bonus * entropy, end_mask)
    assert float(total) == pytest.approx((-1.2 + 2.0) / 2 - bonus * (0.7 + 0.1) / 2)
    assert float(P.masked_mean(ratio, end_mask)) == pytest.approx((torch.e ** 0.5 + 1) / 2)


def test_clipped_value_loss_hand_values():
    values, prev, returns = t([1.0, 0.0, 2.0]), t([0.5, 0.5, 2.0]), t([3.0, -1.0, 1.0])
    loss = P.clipped_value_loss(values, prev, returns, clip_val=0.2)
    # v_clip = [0.7, 0.3, 2.0]; max((1-3)^2, (0.7-3)^2) = 5.29; max(1, 1.69) = 1.69; max(1, 1) = 1
    assert loss.tolist() == pytest.approx([0.5 * 5.29, 0.5 * 1.69, 0.5])
    assert P.clipped_value_loss(values, prev, returns, clip_val=0.0).tolist() == pytest.approx([2.0, 0.5, 0.5])


def test_gradcheck_ppo_functions():
    torch.manual_seed(1)
    values = torch.randn(3, 4, **D).requires_grad_()
    prev, returns = torch.randn(3, 4, **D), torch.randn(3, 4, **D)
    assert torch.autograd.gradcheck(lambda v: P.clipped_value_loss(v, prev, returns, 0.3), (values,))
    logp = (torch.randn(3, 4, **D) * 0.3 - 1).requires_grad_()
    init = torch.randn(3, 4, **D) * 0.3 - 1
    mask = (torch.rand(3, 4) > 0.3).to(torch.float64)
    assert torch.autograd.gradcheck(lambda x: P.ppo_token_rewards(t([1.0, 2.0, 3.0]), mask,
                                                                  P.kl_penalty(x, init, False), 0.1), (logp,))
