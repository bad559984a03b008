"""Per-token log-probabilities and entropy from vocab-parallel logits.

Under tensor parallelism each rank holds logits for a slice of the vocabulary
(``[..., V / tp]``). Both functions reduce over the vocabulary with three all-reduces of
``[...]``-shaped tensors (max, sum of exponentials, one more sum); the full-vocabulary
logits are never gathered, so the result is exact and memory stays at one
vocabulary-slice-sized buffer.

    log p(y_t) = z_t[y_t] - log sum_v exp(z_t[v])
    H_t       = log Z_t - sum_v p_t[v] z_t[v]

With one tensor-parallel rank there is nothing to reduce: the log-probs come from one fused
log-softmax (:class:`_LogProbs`) and the entropy skips its all-reduces.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_logprobs(vocab_parallel_logits: torch.Tensor, target: torch.Tensor, inplace: bool = False):
    """``log p(target)`` for each position, in float32, differentiable.

    ``vocab_parallel_logits``: ``[..., V/tp]``; ``target``: ``[...]`` with global vocab ids.
    Megatron's kernel shifts float32 logits in place to save memory; unless
    ``inplace=True`` the logits are cloned first so the caller's tensor is unchanged.
    One tensor-parallel rank: :class:`_LogProbs` (the caller's tensor is never changed).
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return _LogProbs.apply(vocab_parallel_logits, target)
    if vocab_parallel_logits.dtype == torch.float32 and not inplace:
        vocab_parallel_logits = vocab_parallel_logits.clone()
    return -vocab_parallel_cross_entropy(vocab_parallel_logits, target)


class _LogProbs(torch.autograd.Function):
    """``log p(target)`` over the whole vocabulary (one rank): ``log_softmax(z)[target]``;
    d/dz_v = g (1[v = target] - p_v).

    Megatron's vocab-parallel kernel at one rank costs three all-reduces and a dozen ops
    around them; this is one log-softmax and a gather. As in Megatron's, the forward keeps
    one ``[..., V]`` float32 buffer (the softmax) and the backward writes the gradient into it.
    A target outside ``[0, V)`` gives what Megatron's kernel gives it (its masked logit is 0
    after the shift by ``max(z)``: ``max(z) - logsumexp(z)``, with no gradient through the
    max), so results do not depend on the tensor-parallel layout.
    """

    @staticmethod
    def forward(ctx, logits, target):
        z = logits.float()
        logp = torch.log_softmax(z, dim=-1)
        valid = (target >= 0) & (target < z.shape[-1])
        index = torch.where(valid, target, 0).unsqueeze(-1)
        picked = logp.gather(-1, index).squeeze(-1)
        if not bool(valid.all()):
            picked = torch.where(valid, picked, logp.amax(dim=-1))
        ctx.save_for_backward(logp.exp_(), index, valid)
        ctx.input_dtype = logits.dtype
        return picked

    @staticmethod
    def backward(ctx, grad_out):
        softmax, index, valid = ctx.saved_tensors
        grad = grad_out.unsqueeze(-1)
        softmax.mul_(-grad).scatter_add_(-1, index, grad * valid.unsqueeze(-1))
        return softmax.to(ctx.input_dtype), None


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log Z - sum_v p_v z_v; dH/dz_v = -p_v (z_v - sum_u p_u z_u)."""

    @staticmethod
    def forward(ctx, logits, group):
        reduce = dist.get_world_size(group) > 1
        z = logits.float()
        z_max = z.max(dim=-1).values
        if reduce:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        z = z - z_max.unsqueeze(-1)
        exp_z = z.exp()
        sum_exp = exp_z.sum(dim=-1)
        if reduce:
            dist.all_reduce(sum_exp, group=group)
        p = exp_z.div_(sum_exp.unsqueeze(-1))
        p_dot_z = (p * z).sum(dim=-1)
        if reduce:
            dist.all_reduce(p_dot_z, group=group)
        ctx.save_for_backward(p, z, p_dot_z)
        ctx.input_dtype = logits.dtype
        return sum_exp.log() - p_dot_z

    @staticmethod
    def backward(ctx, grad_out):
        p, z, p_dot_z = ctx.saved_tensors
        grad = -p * (z - p_dot_z.unsqueeze(-1)) * grad_out.unsqueeze(-1)
        return grad.to(ctx.input_dtype), None


def vocab_parallel_gather(vocab_parallel_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits[..., ids]`` ``[..., K]`` for global vocabulary ids ``ids`` ``[..., K]``, from this
    rank's vocabulary shard: each rank gathers the ids it holds, one all-reduce sums them
    (differentiable; the gradient reaches only the holder's shard)."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    width = vocab_parallel_logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    local = ids - start
    held = (local >= 0) & (local < width)
    picked = vocab_parallel_logits.gather(-1, local.clamp(0, width - 1)) * held
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return picked
    return reduce_from_tensor_model_parallel_region(picked)


def token_entropy(vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, ``[...]``, float32."""
    group = parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelEntropy.apply(vocab_parallel_logits, group)
