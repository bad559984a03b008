"""Core attention for Megatron-Core's local layer spec, on CPU and GPU.

Drop-in for ``DotProductAttention`` (same constructor and forward signature) built on
``torch.nn.functional.scaled_dot_product_attention``. It needs no CUDA memory buffer and
supports packed sequences:

- ``sbhd`` inputs: query ``[sq, b, heads, dim]``, key/value ``[sk, b, groups, dim]``;
  causal attention; when ``sq < sk`` (decoding with a KV cache) the causal mask is
  aligned to the bottom-right, so query ``i`` sees keys ``0 .. sk - sq + i``.
- ``thd`` inputs (``packed_seq_params.qkv_format == "thd"``): query ``[t, heads, dim]``
  holding several sequences back to back, delimited by ``cu_seqlens_q``; each sequence
  attends causally to itself only, never across a boundary. With
  ``packed_seq_params.prefix_lens`` (one int per segment), a segment with ``L > 0``
  continues the first ``L`` tokens of the segment before it (a prompt shared by a pair's
  responses): its queries also see those ``L`` keys, as if they preceded it.

Output is ``[sq, b, heads * dim]`` (``[t, heads * dim]`` for ``thd``).
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        tp = (
            pg_collection.tp.size()
            if pg_collection is not None and hasattr(pg_collection, "tp")
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, attn_mask=None, is_causal=False):
        """q ``[b, h, sq, d]``, k/v ``[b, g, sk, d]`` -> ``[b, h, sq, d]``."""
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.heads != self.groups,
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)

        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if attention_mask is not None:
            # Megatron's convention: True marks a position that must NOT be attended.
            out = self._sdpa(q, k, v, attn_mask=~attention_mask.bool())
        elif sq == sk:
            out = self._sdpa(q, k, v, is_causal=True)
        else:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            out = self._sdpa(q, k, v, attn_mask=mask)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _forward_thd(self, query, key, value, packed_seq_params):
        plan = getattr(packed_seq_params, "_sdpa_plan", None)
        if plan is None:  # made once per forward: every layer gets the same packed_seq_params
            cu_q = packed_seq_params.cu_seqlens_q.tolist()
            if packed_seq_params.cu_seqlens_kv.tolist() != cu_q:
                raise ValueError("packed attention needs identical query and key boundaries")
            prefix_lens = getattr(packed_seq_params, "prefix_lens", None)
            plan = _PackedPlan(cu_q, prefix_lens, query.device)
            packed_seq_params._sdpa_plan = plan
        # Each bucket of segments is gathered into a padded batch [n, heads, L, dim] and runs
        # as one causal attention call (a call per segment costs more than the arithmetic of
        # a short one). index_select rather than advanced indexing: its backward is an
        # index_add, several times faster than the accumulating index_put.
        outs = []
        for index, (n, length), keep in plan.buckets:
            q, k, v = (x.index_select(0, index).view(n, length, *x.shape[1:]).transpose(1, 2)
                       for x in (query, key, value))
            out = self._sdpa(q, k, v, is_causal=True)
            outs.append(out.transpose(1, 2).reshape(n * length, self.heads * self.head_dim).index_select(0, keep))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if plan.order is None else out.index_select(0, plan.order)


# Fixed cost of one more attention call (its gathers, kernel launch and backward), in units
# of the query-key pairs a causal call computes: splitting segments of very different lengths
# into buckets pays when it saves more padded pairs than this.
BUCKET_CALL_COST = 16384


class _PackedPlan:
    """How a packed row (segments back to back, ``cu_seqlens``) runs as padded batches.

    Segment ``i`` (``n_i`` tokens from ``s_i``) continuing ``L_i = prefix_lens[i]`` tokens of
    segment ``i - 1`` becomes the sequence of those ``L_i`` tokens followed by its own: causal
    attention over it gives its own tokens exactly what they see (the shared prefix, then
    themselves), and the ``L_i`` prefix outputs are dropped. Every sequence is causal from its
    first token, so SDPA's causal kernel runs everywhere, with no mask (right padding only adds
    keys after every real query). Sequences are sorted by length and cut into buckets (one
    attention call each) where the padding saved outweighs a call's fixed cost.

    ``buckets``: ``(gather index [n * L], (n, L), kept rows [k])`` per bucket; ``order``: the
    permutation from the buckets' kept rows, concatenated, to the packed tokens (None when it
    is the identity). Padding slots point at token 0: finite values whose outputs are dropped.
    """

    def __init__(self, cu, prefix_lens, device):
        cu_t = torch.tensor(cu, dtype=torch.long)
        lengths = cu_t[1:] - cu_t[:-1]
        prefixes = torch.tensor(list(prefix_lens), dtype=torch.long) if prefix_lens else torch.zeros_like(lengths)
        starts, previous_starts = cu_t[:-1], torch.cat([cu_t[:1], cu_t[:-2]])  # of segments i and i - 1
        sizes = lengths + prefixes
        segments = torch.nonzero(lengths > 0).flatten()
        segments = segments[torch.argsort(sizes[segments], descending=True, stable=True)]
        self.buckets, kept_tokens = [], []
        for first, last in _cut(sizes[segments].tolist()):
            members = segments[first:last]
            n, shared = lengths[members, None], prefixes[members, None]
            width = int(sizes[members[0]])
            j = torch.arange(width)[None, :]
            own = (j >= shared) & (j < shared + n)
            index = torch.where(j < shared, previous_starts[members, None] + j,
                                torch.where(own, starts[members, None] + j - shared, 0))
            rows = torch.arange(len(members))[:, None] * width + j
            self.buckets.append((index.reshape(-1).to(device), (len(members), width), rows[own].to(device)))
            kept_tokens.append((starts[members, None] + j - shared)[own])
        tokens = torch.cat(kept_tokens)
        identity = bool(torch.equal(tokens, torch.arange(len(tokens))))
        self.order = None if identity else torch.empty_like(tokens).scatter_(
            0, tokens, torch.arange(len(tokens))).to(device)


def _cut(sizes: list[int]) -> list[tuple[int, int]]:
    """Cut ``sizes`` (descending) into runs ``[first, last)`` minimising the sum over runs of
    ``BUCKET_CALL_COST`` + the causal pairs of ``last - first`` sequences padded to
    ``sizes[first]``. Dynamic programming over the cut points between length classes (each
    ~9% wide: a cut inside one saves little padding), so a row of hundreds of segments costs
    a few thousand steps, not ``len(sizes)`` squared."""
    classes = [math.ceil(8 * math.log2(max(x, 1))) for x in sizes]
    points = [i for i in range(len(sizes)) if i == 0 or classes[i] != classes[i - 1]] + [len(sizes)]
    best = [0.0] + [float("inf")] * (len(points) - 1)  # best[k]: cost of sizes[:points[k]]
    cut_at = [0] * len(points)
    for b in range(1, len(points)):
        for a in range(b):
            width = sizes[points[a]]
            cost = best[a] + BUCKET_CALL_COST + (points[b] - points[a]) * width * (width + 1) / 2
            if cost < best[b]:
                best[b], cut_at[b] = cost, a
    runs, b = [], len(points) - 1
    while b > 0:
        runs.append((points[cut_at[b]], points[b]))
        b = cut_at[b]
    return runs[::-1]
