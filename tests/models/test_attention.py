"""SDPACoreAttention: causal, GQA, KV-cache alignment and packed (thd) sequences."""

import math
from types import SimpleNamespace

import torch

from nemo_aligner.models.attention import SDPACoreAttention


def make(heads=4, groups=2, dim=8):
    cfg = SimpleNamespace(context_parallel_size=1, num_attention_heads=heads, num_query_groups=groups,
                          kv_channels=dim, attention_dropout=0.0)
    attn = SDPACoreAttention.__new__(SDPACoreAttention)
    torch.nn.Module.__init__(attn)
    attn.config = cfg
    attn.heads, attn.groups, attn.head_dim = heads, groups, dim
    attn.softmax_scale, attn.dropout_p = 1 / math.sqrt(dim), 0.0
    return attn


def reference(q, k, v):
    """Naive causal attention; q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d]."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    sk = k.shape[0]
    mask = torch.ones(s, sk, dtype=torch.bool).tril(sk - s)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, h * d)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_causal_gqa_matches_naive():
    attn = make()
    q, k, v = rand(6, 2, 4, 8, seed=1), rand(6, 2, 2, 8, seed=2), rand(6, 2, 2, 8, seed=3)
    torch.testing.assert_close(attn(q, k, v, None), reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_fewer_queries_than_keys_align_bottom_right():
    attn = make()
    q, k, v = rand(6, 1, 4, 8, seed=1), rand(6, 1, 2, 8, seed=2), rand(6, 1, 2, 8, seed=3)
    full = attn(q, k, v, None)
    last_two = attn(q[-2:], k, v, None)  # decoding: 2 new queries over a cache of 6 keys
    torch.testing.assert_close(last_two, full[-2:], rtol=1e-5, atol=1e-5)


def test_packed_thd_never_attends_across_boundaries():
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = make()
    lens = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    q, k, v = rand(10, 4, 8, seed=4), rand(10, 2, 8, seed=5), rand(10, 2, 8, seed=6)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    packed = attn(q, k, v, None, packed_seq_params=params)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        expected = reference(q[sl].unsqueeze(1), k[sl].unsqueeze(1), v[sl].unsqueeze(1))[:, 0]
        torch.testing.assert_close(packed[sl], expected, rtol=1e-5, atol=1e-5)
        start += n


def test_packed_thd_segment_continuing_a_shared_prefix():
    """Segments [prompt + a] and [b] with prefix_lens 3: b's rows equal those of the unshared
    sequence prompt + b, and a is unaffected."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = make()
    q, k, v = rand(9, 4, 8, seed=7), rand(9, 2, 8, seed=8), rand(9, 2, 8, seed=9)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)  # [p0 p1 p2 a0 a1] [b0 b1 b2 b3]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    params.prefix_lens = [0, 3]
    packed = attn(q, k, v, None, packed_seq_params=params)
    full = lambda x, idx: x[idx].unsqueeze(1)  # noqa: E731
    a = list(range(5))
    b = [0, 1, 2, 5, 6, 7, 8]
    torch.testing.assert_close(packed[:5], reference(full(q, a), full(k, a), full(v, a))[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[5:], reference(full(q, b), full(k, b), full(v, b))[3:, 0], rtol=1e-5, atol=1e-5)


def test_packed_thd_many_segments_prefixes_and_empty_ones_with_gradients():
    """A row of segments of mixed lengths, some continuing the previous one's first tokens and
    some empty (a padding tail of length 0): outputs and gradients equal naive attention over
    each segment's own sequence (its shared prefix, then its tokens)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = make()
    lengths = [4, 3, 0, 6, 2, 5, 1]
    prefixes = [0, 2, 0, 0, 4, 0, 3]  # segment i continues prefixes[i] tokens of segment i - 1
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q = rand(t, 4, 8, seed=10).requires_grad_()
    k = rand(t, 2, 8, seed=11).requires_grad_()
    v = rand(t, 2, 8, seed=12).requires_grad_()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    params.prefix_lens = prefixes
    weights = rand(t, 32, seed=13)
    packed = attn(q, k, v, None, packed_seq_params=params)
    (packed * weights).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]

    for x in (q, k, v):
        x.grad = None
    expected = torch.zeros(t, 32)
    for i, (n, shared) in enumerate(zip(lengths, prefixes)):
        if n == 0:
            continue
        start = int(cu[i])
        keys = list(range(int(cu[i - 1]), int(cu[i - 1]) + shared)) + list(range(start, start + n))
        row = lambda x: x[keys].unsqueeze(1)  # noqa: E731
        expected[start : start + n] = reference(row(q), row(k), row(v))[shared:, 0]
    (expected * weights).sum().backward()
    torch.testing.assert_close(packed, expected.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segments_of_very_different_lengths_run_in_buckets_with_the_same_result():
    """Long and short segments (with a shared prefix) are cut into several attention calls; the
    output is still naive attention over each segment's own sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_aligner.models.attention import _cut, _PackedPlan

    assert _cut([40, 40, 40]) == [(0, 3)]  # equal lengths: one call
    assert _cut([400, 390, 4, 3]) == [(0, 2), (2, 4)]
    attn = make(heads=2, groups=1, dim=4)
    lengths, prefixes = [300, 3, 280, 2, 5], [0, 0, 0, 2, 0]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    assert len(_PackedPlan(cu.tolist(), prefixes, "cpu").buckets) > 1
    t = int(cu[-1])
    q, k, v = rand(t, 2, 4, seed=20), rand(t, 1, 4, seed=21), rand(t, 1, 4, seed=22)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=300, max_seqlen_kv=300)
    params.prefix_lens = prefixes
    packed = attn(q, k, v, None, packed_seq_params=params)
    for i, (n, shared) in enumerate(zip(lengths, prefixes)):
        start = int(cu[i])
        keys = list(range(int(cu[i - 1]), int(cu[i - 1]) + shared)) + list(range(start, start + n))
        row = lambda x: x[keys].unsqueeze(1)  # noqa: E731
        torch.testing.assert_close(packed[start : start + n], reference(row(q), row(k), row(v))[shared:, 0],
                                   rtol=1e-5, atol=1e-5)
