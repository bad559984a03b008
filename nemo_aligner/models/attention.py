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
        plan = getattr(packed_seq_params, "_sdpa_plan", None)
        if plan is None:  # made once per forward: every layer gets the same packed_seq_params
            prefix_lens = getattr(packed_seq_params, "prefix_lens", None)
            plan = _PackedPlan(cu_q, prefix_lens, query.device)
            packed_seq_params._sdpa_plan = plan
        # Segments gathered into a padded batch [n, heads, L, dim]: one attention call for all
        # of them (a call per segment costs more than the arithmetic of a short one).
        q = query[plan.q_index].permute(0, 2, 1, 3)
        k = key[plan.k_index].permute(0, 2, 1, 3)
        v = value[plan.k_index].permute(0, 2, 1, 3)
        out = self._sdpa(q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None)
        out = out.permute(0, 2, 1, 3).reshape(-1, self.heads * self.head_dim)
        return out[plan.out_index]


class _PackedPlan:
    """Index tensors that turn a packed row (segments back to back, ``cu_seqlens``) into a
    padded batch of segments and back.

    Segment ``i`` (``n_i`` tokens) becomes row ``i``: queries are its tokens; keys are, when it
    continues ``L_i = prefix_lens[i]`` tokens of segment ``i - 1``, those tokens followed by its
    own. Query ``j`` sees keys ``0 .. L_i + j`` (causal, after the shared prefix). Without any
    prefix the mask is plain causal (right padding only adds rows and keys nobody reads), so
    SDPA's causal kernel runs without a mask.
    """

    def __init__(self, cu, prefix_lens, device):
        starts, lengths = cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:])]
        prefixes = list(prefix_lens) if prefix_lens else [0] * len(lengths)
        segments = [i for i, n in enumerate(lengths) if n > 0]
        lq = max(lengths[i] for i in segments)
        lk = max(lengths[i] + prefixes[i] for i in segments)
        q_index = torch.zeros(len(segments), lq, dtype=torch.long)
        k_index = torch.zeros(len(segments), lk, dtype=torch.long)
        out_index = []
        use_mask = any(prefixes[i] for i in segments)
        mask = torch.zeros(len(segments), 1, lq, lk, dtype=torch.bool) if use_mask else None
        for row, i in enumerate(segments):
            n, shared = lengths[i], prefixes[i]
            own = torch.arange(starts[i], starts[i] + n)
            q_index[row, :n] = own
            keys = torch.cat([torch.arange(starts[i - 1], starts[i - 1] + shared), own]) if shared else own
            k_index[row, : len(keys)] = keys
            out_index.extend(range(row * lq, row * lq + n))
            if mask is not None:
                allowed = torch.ones(n, shared + n, dtype=torch.bool).tril(diagonal=shared)
                mask[row, 0, :n, : shared + n] = allowed
                mask[row, 0, n:, 0] = True  # padding queries: one key, so no row is empty (their output is dropped)
        self.q_index = q_index.to(device)
        self.k_index = k_index.to(device)
        self.out_index = torch.tensor(out_index, dtype=torch.long, device=device)
        self.mask = None if mask is None else mask.to(device)
