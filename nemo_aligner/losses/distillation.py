"""Knowledge distillation from a teacher's top-k logits (NeMo-Aligner's definitions).

Per token, with the teacher's ``K`` highest logits ``t_k`` and their ids ``i_k``, and the
student's logits ``z`` at the same ids, both renormalised over those ``K`` ids::

    p_k = softmax_k(target_logits_scale * t)          (teacher)
    q_k = softmax_k(logits_scale * z[i_k])            (student)

    fwd_kl = sum_k p_k (log p_k - log q_k)            KL(teacher || student), the default
    bwd_kl = sum_k q_k (log q_k - log p_k)            KL(student || teacher)

and the token's loss ``kd_loss_weight * kd + sft_loss_weight * sft``, where ``sft`` is the
next-token cross-entropy of the scaled student logits ``logits_scale * z`` over the whole
vocabulary. The student's logits at the teacher's ids are gathered from its vocab-parallel
shard with :func:`~nemo_aligner.models.logprobs.vocab_parallel_gather` (no full-vocabulary
gather under tensor parallelism).
"""

import torch

KD_LOSSES = ("fwd_kl", "bwd_kl")


def topk_kl(student_topk_logits: torch.Tensor, teacher_topk_logits: torch.Tensor, kd_loss: str = "fwd_kl",
            logits_scale: float = 1.0, target_logits_scale: float = 1.0) -> torch.Tensor:
    """The KL term above for each token, ``[...]`` from ``[..., K]`` logits (float32)."""
    if kd_loss not in KD_LOSSES:
        raise ValueError(f"kd_loss={kd_loss!r}; choose one of {KD_LOSSES}")
    log_q = torch.log_softmax(logits_scale * student_topk_logits.float(), dim=-1)
    log_p = torch.log_softmax(target_logits_scale * teacher_topk_logits.float(), dim=-1)
    if kd_loss == "fwd_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def distillation_token_loss(kd: torch.Tensor, sft: torch.Tensor, kd_loss_weight: float,
                            sft_loss_weight: float) -> torch.Tensor:
    """``kd_loss_weight * kd + sft_loss_weight * sft`` per token."""
    return kd_loss_weight * kd + sft_loss_weight * sft
