"""Supervised (next-token) loss."""

import torch


def masked_token_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor):
    """Negative log-likelihood summed over the tokens selected by ``loss_mask``.

        L = - sum_t m_t * log p(y_t),     N = sum_t m_t

    Returns ``(L, N)``. The trainer sums both over every micro-batch and data-parallel rank
    of a global batch and reports ``L / N``: a per-token mean over the whole global batch,
    which does not depend on how the batch is split across ranks or micro-batches.
    """
    mask = loss_mask.to(logprobs.dtype)
    return -(logprobs * mask).sum(), loss_mask.sum()
