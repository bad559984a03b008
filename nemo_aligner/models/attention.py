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
        cu_q = packed_seq_params.cu_seqlens_q.tolist()
        cu_k = packed_seq_params.cu_seqlens_kv.tolist()
        if cu_q != cu_k:
            raise ValueError("packed attention needs identical query and key boundaries")
        # One split per tensor, not a slice per sequence: a slice's backward allocates a
        # zero gradient of the whole packed tensor, so slicing n sequences cost n full-size
        # zero-fills and adds per layer; split's backward is a single concatenation.
        lengths = [end - start for start, end in zip(cu_q[:-1], cu_q[1:])]
        prefix_lens = getattr(packed_seq_params, "prefix_lens", None) or [0] * len(lengths)
        keys, values = key.split(lengths), value.split(lengths)
        pieces = []
        for i, q in enumerate(query.split(lengths)):
            n, shared = q.shape[0], prefix_lens[i]
            if n == 0:
                continue
            k, v, mask = keys[i], values[i], None
            if shared:
                # Query j sits at position shared + j: it sees the shared keys and itself causally.
                k, v = torch.cat([keys[i - 1][:shared], k]), torch.cat([values[i - 1][:shared], v])
                mask = torch.ones(n, shared + n, dtype=torch.bool, device=q.device).tril(diagonal=shared)
            # [len, h, d] -> [1, h, len, d]
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out = self._sdpa(q, k, v, attn_mask=mask, is_causal=mask is None)
            pieces.append(out[0].transpose(0, 1))
        out = torch.cat(pieces, dim=0)
        return out.reshape(query.shape[0], self.heads * self.head_dim)
