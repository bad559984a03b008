"""RoPE with cached tables against Megatron's unfused function: same values bit for bit,
same gradients, and Megatron's function for the cases the cache does not cover."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_aligner.models import rope


def _config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **kw)


def _freqs(rows, rot, seed=0):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    f = torch.outer(torch.arange(rows).float() + seed, inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]


def _both(t, freqs, config, **kw):
    """Ours and Megatron's outputs and input gradients (a random upstream gradient)."""
    outs = []
    for fn in (rope.apply_rotary_pos_emb, rope_utils.apply_rotary_pos_emb):
        x = t.clone().requires_grad_(True)
        y = fn(x, freqs, config, **kw)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append((y.detach(), x.grad))
    return outs


@pytest.mark.parametrize("rot", [16, 8])  # the whole head, or part of it (the rest passes through)
def test_sbhd_matches_megatron(dist_world_of_one, rot):
    t = torch.randn(7, 3, 4, 16, generator=torch.Generator().manual_seed(0))
    (y, g), (y_ref, g_ref) = _both(t, _freqs(7, rot), _config())
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["one segment", "a row per token"])
def test_packed_matches_megatron(dist_world_of_one, layout):
    from megatron.core import parallel_state

    t = torch.randn(10, 4, 16, generator=torch.Generator().manual_seed(1))
    if layout == "one segment":
        cu, freqs = torch.tensor([0, 10], dtype=torch.int32), _freqs(12, 16)
    else:  # Megatron's exact mapping: freqs holds each packed token's row (positions restart at 6)
        cu, freqs = torch.tensor([0, 6, 10], dtype=torch.int32), torch.cat((_freqs(6, 16), _freqs(4, 16)))
    group = parallel_state.get_context_parallel_group()
    (y, g), (y_ref, g_ref) = _both(t, freqs, _config(), cu_seqlens=cu, cp_group=group)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


def test_tables_are_reused_and_other_cases_go_to_megatron(dist_world_of_one, monkeypatch):
    from megatron.core import parallel_state

    calls = []
    monkeypatch.setattr(rope, "_megatron_apply", lambda *a, **k: calls.append(k) or rope_utils.apply_rotary_pos_emb(*a, **k))
    made = []
    real_cos = torch.cos
    monkeypatch.setattr(torch, "cos", lambda x: made.append(1) or real_cos(x))
    freqs, config = _freqs(5, 16), _config()
    q, k = torch.randn(5, 2, 4, 16), torch.randn(5, 2, 2, 16)
    rope.apply_rotary_pos_emb(q, freqs, config)
    rope.apply_rotary_pos_emb(k, freqs, config)
    assert len(made) == 1 and not calls  # one table for the query and the key
    rope.apply_rotary_pos_emb(q, _freqs(5, 16), config)
    assert len(made) == 2  # another frequency tensor: new tables

    # packed segments restarting their positions, YaRN's mscale, interleaved rotation
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    group = parallel_state.get_context_parallel_group()
    rope.apply_rotary_pos_emb(q[:, 0], _freqs(8, 16), config, cu_seqlens=cu, cp_group=group)
    rope.apply_rotary_pos_emb(q, freqs, config, mscale=1.1)
    rope.apply_rotary_pos_emb(q, freqs, _config(rotary_interleaved=True))
    assert len(calls) == 3


def test_installed_for_models_on_the_local_spec(dist_world_of_one, monkeypatch):
    from megatron.core.transformer import attention

    from nemo_aligner.models.gpt import build_gpt_model

    monkeypatch.setattr(attention, "apply_rotary_pos_emb", rope_utils.apply_rotary_pos_emb)
    build_gpt_model({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "encoder_seq_length": 8}, 50)
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
