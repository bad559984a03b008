"""A packed batch gives the same per-sample loss (and gradients) as the samples unpacked."""

import pytest
import torch

from nemo_aligner.data.datasets import SFTDataset, sft_collate
from nemo_aligner.data.packing import PackedDataset
from nemo_aligner.data.tokenizers import load_tokenizer
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.models.logprobs import token_logprobs
from helpers import ROOT

LLAMA = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, encoder_seq_length=128)
GPT2 = dict(LLAMA, normalization="layernorm", activation="gelu", bias=True,
            position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
            num_query_groups=4)


def per_sample_loss(model, batch, segments):
    """Sum of -log p over each sample's response tokens; ``segments[i]`` = (row, start, end)."""
    logp = token_logprobs(forward_batch(model, batch), batch["labels"])
    nll = -(logp * batch["loss_mask"])
    return torch.stack([nll[row, a:b].sum() for row, a, b in segments])


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_packed_equals_unpacked(arch, dist_world_of_one):
    tok = load_tokenizer(str(ROOT / "data/quickstart/tokenizer.json"))
    ds = SFTDataset(str(ROOT / "data/quickstart/sft_train.jsonl"), tok, 64)
    subset = torch.utils.data.Subset(ds, list(range(7)))
    subset.lengths = [ds.lengths[i] for i in range(7)]
    model = build_gpt_model(arch, tok.vocab_size, seed=3)

    unpacked = sft_collate([subset[i] for i in range(7)], pad_id=tok.pad_id)
    unpacked_segments = [(i, 0, subset.lengths[i]) for i in range(7)]
    bins = [[0, 1, 2], [3, 4], [5, 6]]
    packed_ds = PackedDataset.from_bins(subset, bins, pack_size=128)
    packed = sft_collate([packed_ds[j] for j in range(len(bins))], pad_id=tok.pad_id, pad_to=128)
    packed_segments = []
    for row, members in enumerate(bins):
        start = 0
        for i in members:
            packed_segments.append((i, row, start, start + subset.lengths[i]))
            start += subset.lengths[i]
    packed_segments = [s[1:] for s in sorted(packed_segments)]

    loss_u = per_sample_loss(model, unpacked, unpacked_segments)
    loss_u.sum().backward()
    grads_u = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_p = per_sample_loss(model, packed, packed_segments)
    loss_p.sum().backward()

    assert loss_u.min() > 0
    torch.testing.assert_close(loss_p, loss_u, rtol=0, atol=1e-4)
    for gp, gu in zip((p.grad for p in model.parameters()), grads_u):
        torch.testing.assert_close(gp, gu, rtol=1e-4, atol=1e-6)
