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
        # Segments gathered into a padded batch [n, heads, L, dim]: one attention call for all
        # of them (a call per segment costs more than the arithmetic of a short one).
        # index_select rather than advanced indexing: its backward is an index_add, several
        # times faster than the accumulating index_put advanced indexing takes.
        n, lq, lk = plan.shape
        q = query.index_select(0, plan.q_index).view(n, lq, *query.shape[1:]).transpose(1, 2)
        k = key.index_select(0, plan.k_index).view(n, lk, *key.shape[1:]).transpose(1, 2)
        v = value.index_select(0, plan.k_index).view(n, lk, *value.shape[1:]).transpose(1, 2)
        out = self._sdpa(q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None)
        out = out.transpose(1, 2).reshape(n * lq, self.heads * self.head_dim)
        return out.index_select(0, plan.out_index)


class _PackedPlan:
    """Index tensors that turn a packed row (segments back to back, ``cu_seqlens``) into a
    padded batch of segments and back (flat indices, for ``index_select``).

    Segment ``i`` (``n_i`` tokens from ``s_i``) becomes row ``i``: queries are its tokens; keys
    are, when it continues ``L_i = prefix_lens[i]`` tokens of segment ``i - 1``, those tokens
    followed by its own. Query ``j`` sees keys ``0 .. L_i + j`` (causal, after the shared
    prefix). Without any prefix the mask is plain causal (right padding only adds rows and
    keys nobody reads), so SDPA's causal kernel runs without a mask. Padding slots point at
    token 0: finite values whose outputs are dropped.
    """

    def __init__(self, cu, prefix_lens, device):
        cu_t = torch.tensor(cu, dtype=torch.long)
        lengths_all = cu_t[1:] - cu_t[:-1]
        keep = lengths_all > 0
        starts, lengths = cu_t[:-1][keep], lengths_all[keep]
        if prefix_lens:
            prefixes = torch.tensor(list(prefix_lens), dtype=torch.long)[keep]
            previous_starts = torch.cat([cu_t[:1], cu_t[:-2]])[keep]  # start of segment i - 1
        else:
            prefixes = torch.zeros_like(lengths)
            previous_starts = starts
        n = len(lengths)
        lq = int(lengths.max())
        lk = int((lengths + prefixes).max())
        j_q = torch.arange(lq)
        j_k = torch.arange(lk)
        valid_q = j_q[None, :] < lengths[:, None]
        q_index = torch.where(valid_q, starts[:, None] + j_q[None, :], 0)
        in_prefix = j_k[None, :] < prefixes[:, None]
        own = (j_k[None, :] >= prefixes[:, None]) & (j_k[None, :] < (prefixes + lengths)[:, None])
        k_index = torch.where(in_prefix, previous_starts[:, None] + j_k[None, :],
                              torch.where(own, starts[:, None] + j_k[None, :] - prefixes[:, None], 0))
        rows = torch.arange(n)[:, None] * lq + j_q[None, :]
        self.shape = (n, lq, lk)
        self.q_index = q_index.reshape(-1).to(device)
        self.k_index = k_index.reshape(-1).to(device)
        self.out_index = rows[valid_q].to(device)
        self.mask = None
        if bool((prefixes > 0).any()):
            # Query j of row i sees keys up to L_i + j; a padding query sees at least key 0.
            mask = j_k[None, None, :] <= (prefixes[:, None, None] + j_q[None, :, None])
            self.mask = mask.unsqueeze(1).to(device)
