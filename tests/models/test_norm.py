"""RMSNorm with a hand-written backward against torch's: the same forward bit for bit, the
same gradients, in every dtype; GPT models use it for every RMSNorm."""

import pytest
import torch

from nemo_aligner.models.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("eps", [1e-5, None])
def test_matches_torch_rmsnorm(dtype, eps):
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.RMSNorm(48, eps=eps).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(48, generator=g) + 0.5)
    ours = RMSNorm(48, eps=eps).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(2, 9, 48, generator=g) * 3).to(dtype)
    upstream = torch.randn(2, 9, 48, generator=g).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(xa), ours(xb)
    assert yb.dtype == dtype and torch.equal(ya, yb)
    ya.backward(upstream)
    yb.backward(upstream)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
    assert xb.grad.dtype == dtype and ours.weight.grad.dtype == dtype


def test_gradient_against_the_formula_in_float64():
    """dL/dx = r (g w - x̂ mean(g w x̂)), dL/dw = Σ g x̂, checked by finite differences."""
    from nemo_aligner.models.norm import _RMSNormFunction

    weight = torch.linspace(0.5, 1.5, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-3), (x, weight))


def test_gpt_models_use_it(dist_world_of_one):
    from nemo_aligner.models.gpt import build_gpt_model

    cfg = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
           "encoder_seq_length": 16, "normalization": "rmsnorm"}
    model = build_gpt_model(cfg, vocab_size=50, seed=1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 5 and all(type(m) is RMSNorm for m in norms)  # 2 per layer and the final one
    assert "decoder.final_layernorm.weight" in model.state_dict()
