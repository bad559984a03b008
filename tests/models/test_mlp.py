"""SwiGLU as one autograd function: Megatron's values and gradients bit for bit, its formula
by finite differences, Megatron's forward for every other activation or option, and GPT
models on the local spec built with it."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from nemo_aligner.models.mlp import SwiGLUMLP, _SwiGLU, swiglu


def _megatron_glu(x, offset=0.0):
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * (b + offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_values_and_gradient_as_megatrons_formula(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(13, 2, 2 * 24, generator=g) * 3).to(dtype)
    upstream = torch.randn(13, 2, 24, generator=g).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = _megatron_glu(xa), swiglu(xb)
    assert yb.dtype == dtype and torch.equal(ya, yb)
    ya.backward(upstream)
    yb.backward(upstream)
    assert xb.grad.dtype == dtype and xb.grad.is_contiguous() and torch.equal(xa.grad, xb.grad)


def test_gradient_against_finite_differences():
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (x,))


def _mlp_model(dist, **cfg):
    from nemo_aligner.models.gpt import build_gpt_model

    base = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4,
            "encoder_seq_length": 16}
    return build_gpt_model({**base, **cfg}, vocab_size=50, seed=1)


def _grads(model):
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    model.zero_grad()
    model(tokens, torch.arange(12).expand(2, -1), attention_mask=None).float().logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gpt_models_use_it_and_train_the_same(dist_world_of_one):
    """A SwiGLU GPT has SwiGLUMLPs; every gradient is that of Megatron's MLP put back."""
    model = _mlp_model(dist_world_of_one, activation="swiglu")
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 2 and all(type(m) is SwiGLUMLP for m in mlps)
    ours = _grads(model)
    for m in mlps:
        m.__class__ = MLP
    want = _grads(model)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in ours)


@pytest.mark.parametrize("change", [dict(activation="geglu"), dict(glu_linear_offset=1.0)])
def test_megatron_runs_for_other_activations_and_options(dist_world_of_one, monkeypatch, change):
    import nemo_aligner.models.mlp as mlp_module

    calls = []
    monkeypatch.setattr(mlp_module, "swiglu", lambda x: calls.append(1) or _SwiGLU.apply(x))
    activation = change.get("activation", "swiglu")
    model = _mlp_model(dist_world_of_one, activation=activation)
    for m in model.modules():
        if isinstance(m, MLP):
            m.config.glu_linear_offset = change.get("glu_linear_offset", 0.0)
    ours = _grads(model)
    assert calls == []  # not ours: Megatron's formula (with its offset, or GELU)
    for m in model.modules():
        if isinstance(m, MLP):
            m.__class__ = MLP
    want = _grads(model)
    assert all(torch.equal(ours[k], want[k]) for k in ours)
