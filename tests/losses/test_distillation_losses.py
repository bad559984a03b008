"""Top-k distillation loss (NeMo-Aligner's fwd_kl / bwd_kl, renormalised over the teacher's ids)
against hand-computed values, with scales; gradcheck; the vocab-parallel gather; settings."""

import math

import pytest
import torch

from nemo_aligner.losses.distillation import distillation_token_loss, topk_kl

LN3, LN2 = math.log(3.0), math.log(2.0)


@pytest.mark.parametrize("kind,scales,student,teacher,expected", [
    # q = [1/4, 3/4], p = [1/2, 1/2]
    ("fwd_kl", (1.0, 1.0), [0.0, LN3], [0.0, 0.0], 0.5 * math.log(4 / 3)),
    ("bwd_kl", (1.0, 1.0), [0.0, LN3], [0.0, 0.0], 0.25 * math.log(0.5) + 0.75 * math.log(1.5)),
    # logits_scale 2: q = [1/10, 9/10]; target_logits_scale 0.5: p = [1/3, 2/3]
    ("fwd_kl", (2.0, 0.5), [0.0, LN3], [0.0, 2 * LN2], math.log(10 / 3) / 3 + 2 / 3 * math.log(20 / 27)),
    ("bwd_kl", (2.0, 0.5), [0.0, LN3], [0.0, 2 * LN2], 0.1 * math.log(0.3) + 0.9 * math.log(1.35)),
])
def test_topk_kl_hand_computed(kind, scales, student, teacher, expected):
    got = topk_kl(torch.tensor([student]), torch.tensor([teacher]), kind, *scales)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_topk_kl_is_zero_when_the_student_matches_and_invariant_to_shifts():
    t = torch.randn(3, 5, 4)
    for kind in ("fwd_kl", "bwd_kl"):
        torch.testing.assert_close(topk_kl(t + 7.0, t, kind), torch.zeros(3, 5), atol=1e-6, rtol=0)
    assert (topk_kl(torch.randn(3, 5, 4), t, "fwd_kl") >= 0).all()


@pytest.mark.parametrize("kind", ["fwd_kl", "bwd_kl"])
def test_gradcheck(kind):
    student = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64)
    # topk_kl computes in float32; check the float64 math through the same formula
    def f(z):
        log_q = torch.log_softmax(1.5 * z, -1)
        log_p = torch.log_softmax(0.7 * teacher, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1) if kind == "fwd_kl" else (log_q.exp() * (log_q - log_p)).sum(-1)
    assert torch.autograd.gradcheck(f, (student,))
    ours = topk_kl(student.float(), teacher.float(), kind, 1.5, 0.7)
    torch.testing.assert_close(ours.double(), f(student).detach(), atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    z = student.detach().clone().requires_grad_(True)
    f(z).sum().backward()
    torch.testing.assert_close(student.grad, z.grad, atol=1e-5, rtol=1e-5)


def test_weighted_sum_and_unknown_kind():
    kd, sft = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(distillation_token_loss(kd, sft, 0.5, 2.0), torch.tensor([6.5, 11.0]))
    with pytest.raises(ValueError, match="kd_loss='jsd'"):
        topk_kl(kd[None], kd[None], "jsd")


def test_vocab_parallel_gather_one_rank(dist_world_of_one):
    from nemo_aligner.models.logprobs import vocab_parallel_gather

    logits = torch.randn(2, 3, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 3, 4))
    picked = vocab_parallel_gather(logits, ids)
    torch.testing.assert_close(picked, logits.gather(-1, ids))


@pytest.mark.parametrize("d,needle", [
    ({"kd_loss_weight": 0.0, "sft_loss_weight": 0.0}, "both 0"),
    ({"kd_loss": "kl"}, "kd_loss='kl'"),
    ({"top_k": 0}, "top_k=0"),
])
def test_settings_are_checked(d, needle):
    from omegaconf import OmegaConf

    from nemo_aligner.algorithms.distillation import DistillationSettings

    with pytest.raises(ValueError, match=needle):
        DistillationSettings.from_cfg(OmegaConf.create({"model": {"knowledge_distillation": d}}))
