"""Megatron's linear layers as plain linear maps at one tensor-parallel rank: the same values
and gradients bit for bit as Megatron's autograd functions, Megatron's path wherever the
layout or an option needs it, and GPT models on the local spec built with them."""

import functools

import pytest
import torch
from megatron.core.tensor_parallel import layers as megatron_layers
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from nemo_aligner.models.linear import ColumnLinear, RowLinear, use_plain_linears

CFG = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
       "num_query_groups": 2, "encoder_seq_length": 16}


@pytest.fixture
def config(dist_world_of_one):
    from nemo_aligner.models.gpt import build_gpt_model

    return build_gpt_model(CFG, vocab_size=50, seed=1).config


def _layer(kind, config, bias, skip_bias_add):
    g = torch.Generator().manual_seed(3)
    if kind == "column":
        layer = ColumnParallelLinear(24, 40, config=config, init_method=torch.nn.init.normal_, bias=bias,
                                     skip_bias_add=skip_bias_add, gather_output=False)
    else:
        layer = RowParallelLinear(24, 40, config=config, init_method=torch.nn.init.normal_, bias=bias,
                                  skip_bias_add=skip_bias_add, input_is_parallel=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def _run(layer, forward, x, upstream):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    out, out_bias = forward(layer, x)
    total = out if out_bias is None else out + out_bias
    total.backward(upstream)
    return out, out_bias, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        return True
    assert (a is None) == (b is None)
    assert a is None or torch.equal(a, b)
    return True


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias,skip_bias_add", [(False, False), (True, False), (True, True)])
def test_same_values_and_gradients_as_megatron(config, kind, bias, skip_bias_add):
    layer = _layer(kind, config, bias, skip_bias_add)
    megatron_forward = type(layer).forward
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, 24, generator=g)
    upstream = torch.randn(7, 3, 40, generator=g)
    want = _run(layer, megatron_forward, x, upstream)
    use_plain_linears(layer)
    assert type(layer) is (ColumnLinear if kind == "column" else RowLinear)
    got = _run(layer, lambda m, x: m(x), x, upstream)
    for a, b in zip(got, want):
        _same(a, b)
    assert (got[1] is not None) == skip_bias_add  # the bias comes back unadded when skipped


def test_column_layer_with_a_given_weight(config):
    """The output layer's call with the (tied) embedding weight passed in, and the shape check."""
    layer = _layer("column", config, False, False)
    use_plain_linears(layer)
    w = torch.randn(40, 24, requires_grad=True)
    x = torch.randn(5, 2, 24)
    out, _ = layer(x, weight=w)
    torch.testing.assert_close(out, x @ w.t(), rtol=0, atol=0)
    out.sum().backward()
    assert w.grad is not None and layer.weight.grad is None
    with pytest.raises(RuntimeError, match="supplied weight's shape"):
        layer(x, weight=torch.randn(24, 40))


def test_megatron_runs_where_an_option_needs_it(config, monkeypatch):
    calls = []
    original = megatron_layers.linear_with_grad_accumulation_and_async_allreduce

    @functools.wraps(original)  # (with its attributes: Megatron keeps a flag on it)
    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(megatron_layers, "linear_with_grad_accumulation_and_async_allreduce", spy)
    plain, special = _layer("column", config, True, False), _layer("column", config, True, False)
    special.explicit_expert_comm = True  # an expert layer: Megatron's own communication
    use_plain_linears(plain)
    use_plain_linears(special)
    x = torch.randn(4, 2, 24)
    plain(x)
    assert calls == []
    out, _ = special(x)
    assert calls == [1]
    torch.testing.assert_close(out, plain(x)[0], rtol=0, atol=0)


def test_gpt_models_use_them_and_train_the_same(dist_world_of_one):
    """A GPT on the local spec has only plain linears; its loss and every gradient are those
    of the same model with Megatron's classes put back."""
    from nemo_aligner.models.gpt import build_gpt_model

    model = build_gpt_model(CFG, vocab_size=50, seed=1)
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 2 * 4 + 1 and all(type(m) in (ColumnLinear, RowLinear) for m in linears)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(12).expand(2, -1)

    def grads():
        model.zero_grad()
        model(tokens, positions, attention_mask=None).float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ours = grads()
    for m in linears:
        m.__class__ = ColumnParallelLinear if type(m) is ColumnLinear else RowParallelLinear
    _same(ours, grads())


@pytest.mark.parametrize("tied", [False, True])
def test_weight_gradients_go_into_ddp_main_grad(dist_world_of_one, monkeypatch, tied):
    """Under Megatron's DDP each linear weight's gradient is accumulated into its ``main_grad``
    by the product itself (flagged for DDP's hook), over two micro-batches, to the values of
    torch's own backward plus DDP's hook; a tied embedding (the output layer's weight passed
    in) keeps both its gradients."""
    from nemo_aligner.models import linear
    from nemo_aligner.models.gpt import build_gpt_model
    from nemo_aligner.utils.optim import wrap_ddp

    cfg = dict(CFG, share_embeddings_and_output_weights=tied)
    ddp = wrap_ddp(build_gpt_model(cfg, vocab_size=50, seed=1), cfg)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 50, (2, 12), generator=g) for _ in range(2)]
    positions = torch.arange(12).expand(2, -1)

    def main_grads():
        ddp.zero_grad_buffer()
        for tokens in batches:
            ddp(tokens, positions, attention_mask=None).float().logsumexp(-1).sum().backward()
        return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}

    fused = main_grads()
    flagged = {n for n, p in ddp.module.named_parameters() if p.grad_added_to_main_grad}
    own_weights = {f"{n}.weight" for n, m in ddp.module.named_modules()
                   if type(m) in (ColumnLinear, RowLinear) and m.weight is not None}
    assert flagged == own_weights
    assert len(flagged) == 2 * 4 + (0 if tied else 1)
    monkeypatch.setattr(linear, "_into_main_grad", lambda weight: False)
    unfused = main_grads()
    assert fused.keys() == unfused.keys() and all(p.abs().sum() > 0 for p in unfused.values())
    for name in fused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-5, atol=1e-6, msg=name)
