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
