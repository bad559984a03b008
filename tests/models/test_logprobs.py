"""Log-probs and entropy against direct formulas, and the entropy gradient (float64)."""

import torch

from nemo_aligner.models.logprobs import token_entropy, token_logprobs


def test_logprobs_equal_log_softmax_gather(dist_world_of_one):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g) * 10  # large logits: stability matters
    target = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    original = logits.clone()
    torch.testing.assert_close(token_logprobs(logits, target), expected, rtol=0, atol=1e-5)
    assert torch.equal(logits, original)  # not modified in place unless asked


def test_logprobs_gradient_and_dtype(dist_world_of_one):
    """d log p(y) / dz = onehot(y) - softmax(z), times the upstream gradient; bf16 logits give
    float32 log-probs and a bf16 gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 13, generator=g) * 3
    target = torch.randint(0, 13, (4, 6), generator=g)
    weight = torch.randn(4, 6, generator=g)
    x = logits.clone().requires_grad_(True)
    (token_logprobs(x, target) * weight).sum().backward()
    expected = (torch.nn.functional.one_hot(target, 13) - torch.softmax(logits, -1)) * weight.unsqueeze(-1)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-6)
    y = logits.bfloat16().requires_grad_(True)
    logp = token_logprobs(y, target)
    logp.sum().backward()
    assert logp.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    reference = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, reference, rtol=0, atol=1e-5)


def test_targets_outside_the_vocabulary_as_megatrons_kernel(dist_world_of_one):
    """Out-of-range targets (which Megatron's vocab-parallel kernel masks to a logit of 0) give
    the same values and gradients as that kernel, so no layout changes them."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 9, generator=g) * 2
    target = torch.randint(0, 9, (3, 5), generator=g)
    target[0, 1], target[2, 3], target[1, 0] = -1, 9, 100
    weight = torch.randn(3, 5, generator=g)
    x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = token_logprobs(x, target)
    theirs = -vocab_parallel_cross_entropy(y.clone(), target)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-6)


def test_entropy_value_and_gradient(dist_world_of_one):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    expected = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(token_entropy(logits).double(), expected, rtol=0, atol=1e-6)
    x = logits.clone().requires_grad_(True)
    # The forward runs in float32; compare the analytic backward with autograd of the formula.
    token_entropy(x).sum().backward()
    y = logits.clone().requires_grad_(True)
    q = torch.softmax(y, -1)
    (-(q * torch.log(q)).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-6)
