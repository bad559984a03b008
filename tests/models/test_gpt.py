"""Model builder: config translation, precision, layout-independent initialization."""

import pytest
import torch

from nemo_aligner.models.gpt import ModelConfigError, build_gpt_model, padded_vocab_size
from nemo_aligner.models.forward import full_logits

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, encoder_seq_length=32)


def test_same_seed_same_weights_different_seed_different(dist_world_of_one):
    a, b, c = (build_gpt_model(BASE, 300, seed=s) for s in (1, 1, 2))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.embedding.word_embeddings.weight, c.embedding.word_embeddings.weight)


def test_no_draw_without_initialization(dist_world_of_one, monkeypatch):
    """initialize=False (the caller loads every weight) draws nothing even with a seed: the
    draw reads the untouched weights first, which makes each first write of the load a
    copy-on-write fault."""
    import nemo_aligner.models.gpt as gpt

    drawn = []
    monkeypatch.setattr(gpt, "init_weights_layout_invariant", lambda *a: drawn.append(1))
    build_gpt_model(BASE, vocab_size=100, seed=1, initialize=False)
    assert not drawn
    build_gpt_model(BASE, vocab_size=100, seed=1)
    assert drawn == [1]


def test_vocab_padding_and_shapes(dist_world_of_one):
    assert padded_vocab_size(300, {}) == 384
    model = build_gpt_model(BASE, 300, seed=1)
    assert model.embedding.word_embeddings.weight.shape == (384, 64)
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)  # GQA: 4 query heads, 2 key/value groups


def test_bf16_model_close_to_fp32(dist_world_of_one):
    fp32 = build_gpt_model(BASE, 300, seed=1)
    bf16 = build_gpt_model(dict(BASE, precision="bf16"), 300, seed=1)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, low = full_logits(fp32, tokens), full_logits(bf16, tokens)
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("key,value", [("activation", "tanh"), ("normalization", "batchnorm"),
                                        ("precision", "fp8"), ("position_embedding_type", "alibi")])
def test_unsupported_choices_are_named(key, value, dist_world_of_one):
    with pytest.raises(ModelConfigError, match=key):
        build_gpt_model(dict(BASE, **{key: value}), 300)


def test_rope_scaling_changes_low_frequencies_only(dist_world_of_one):
    plain = build_gpt_model(BASE, 300, seed=1)
    scaled = build_gpt_model(dict(BASE, rope_scaling={"factor": 8.0}), 300, seed=1)
    a, b = plain.rotary_pos_emb.inv_freq, scaled.rotary_pos_emb.inv_freq
    assert torch.equal(a[0], b[0])  # highest frequency untouched
    assert b[-1] == pytest.approx(a[-1] / 8.0)  # lowest frequency divided by the factor


@pytest.mark.parametrize("tied", [False, True])
def test_logits_at_loss_positions_are_the_full_logits_there(tied, dist_world_of_one):
    """``forward_batch(..., logits_at=)`` runs the output layer on the selected tokens' hidden
    states only, and gives the full forward's logits (and gradients) at those tokens."""
    from nemo_aligner.models.forward import forward_batch, loss_positions

    model = build_gpt_model(dict(BASE, share_embeddings_and_output_weights=tied), 300, seed=1)
    g = torch.Generator().manual_seed(0)
    b, s = 3, 20
    mask = (torch.rand(b, s, generator=g) > 0.5).long()
    mask[1] = 0  # a row with no loss at all
    batch = {"tokens": torch.randint(0, 300, (b, s), generator=g), "loss_mask": mask,
             "position_ids": torch.arange(s).expand(b, -1)}
    at = loss_positions(batch)
    assert 0 < len(at) < b * s and torch.equal(at, mask.reshape(-1).nonzero().squeeze(1))
    weights = torch.randn(len(at), 384, generator=g)

    rows_seen, mlp_rows = [], []
    handle = model.output_layer.register_forward_hook(lambda m, args, out: rows_seen.append(out[0].shape[:2]))
    handles = [layer.mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[:2]))
               for layer in model.decoder.layers]
    full = forward_batch(model, batch)
    (full.reshape(-1, 384)[at] * weights).sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    part = forward_batch(model, batch, logits_at=at)
    (part * weights).sum().backward()
    for h in [handle, *handles]:
        h.remove()

    assert rows_seen == [(s, b), (len(at), 1)]  # the output layer saw the selected rows only
    assert mlp_rows == [(s, b), (s, b), (s, b), (len(at), 1)]  # and so did the last layer's MLP
    assert part.shape == (len(at), 384)
    torch.testing.assert_close(part, full.reshape(-1, 384)[at], rtol=1e-5, atol=1e-5)
    for full_grad, p in zip(full_grads, model.parameters()):
        torch.testing.assert_close(p.grad, full_grad, rtol=1e-4, atol=1e-6)


def test_logits_at_in_a_packed_row_with_a_shared_prompt(dist_world_of_one):
    """The same in a packed row (``thd``) whose third segment continues the second's first
    three tokens (a shared prompt): the last layer works on the loss tokens only and the
    logits and gradients are the full forward's there. Under activation recomputation (which
    reruns the layer outside the selection) the last layer keeps every token."""
    from nemo_aligner.models.forward import _last_layer_rows, forward_batch, loss_positions

    g = torch.Generator().manual_seed(2)
    lengths, starts = [8, 6, 5], [0, 0, 3]
    batch = {"tokens": torch.randint(0, 300, (1, sum(lengths)), generator=g),
             "position_ids": torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lengths)])[None],
             "loss_mask": (torch.rand(1, sum(lengths), generator=g) > 0.5).long(),
             "cu_seqlens": torch.tensor([0, 8, 14, 19]), "max_seqlen": 8, "prefix_lens": torch.tensor([0, 0, 3])}
    at = loss_positions(batch)
    model = build_gpt_model(BASE, 300, seed=1)
    weights = torch.randn(len(at), 384, generator=g)
    full = forward_batch(model, batch)
    (full.reshape(-1, 384)[at] * weights).sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    mlp_rows = []
    handle = model.decoder.layers[-1].mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[0]))
    part = forward_batch(model, batch, logits_at=at)
    (part * weights).sum().backward()
    handle.remove()
    assert mlp_rows == [len(at)] and len(at) < sum(lengths)
    torch.testing.assert_close(part, full.reshape(-1, 384)[at], rtol=1e-5, atol=1e-5)
    for full_grad, p in zip(full_grads, model.parameters()):
        torch.testing.assert_close(p.grad, full_grad, rtol=1e-4, atol=1e-6)

    model.config.recompute_granularity = "full"
    with _last_layer_rows(model, at) as selected:
        assert not selected


def test_forward_only_collect_passes_logits_at(dist_world_of_one):
    """The forward-only pass (the reference log-probs' path) takes ``logits_at`` to the output
    layer: it sees the selected tokens only, and the reduction gets their logits."""
    from nemo_aligner.models.collect import forward_only_collect
    from nemo_aligner.models.forward import forward_batch, loss_positions

    model = build_gpt_model(BASE, 300, seed=1)
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, 300, (2, 12), generator=g),
             "loss_mask": (torch.rand(2, 12, generator=g) > 0.4).long(), "position_ids": torch.arange(12).expand(2, -1)}
    rows_seen = []
    handle = model.output_layer.register_forward_hook(lambda m, args, out: rows_seen.append(out[0].shape[0]))
    got = forward_only_collect([model], [batch], lambda logits, b: logits.clone(), logits_at=loss_positions)
    handle.remove()
    at = loss_positions(batch)
    assert rows_seen == [len(at)] and got[0].shape == (len(at), 384)
    with torch.no_grad():
        full = forward_batch(model.eval(), batch)
    torch.testing.assert_close(got[0], full.reshape(-1, 384)[at], rtol=1e-5, atol=1e-5)
