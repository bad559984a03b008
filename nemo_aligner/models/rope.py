"""Rotary embeddings for Megatron's unfused path, with their cosine and sine made once.

Megatron's unfused ``apply_rotary_pos_emb`` takes the cosine and sine of the frequencies at
every call (twice per layer: query and key), rotates with a negation and a concatenation,
and, for packed (``thd``) rows, splits the row into its segments first: a few dozen small
ops per layer, which at small sizes cost more than the layer's arithmetic. Every layer of a
forward gets the same frequency tensor (Megatron's rotary module even returns the same one
across forwards), so :func:`apply_rotary_pos_emb` keeps the tables of the last one:

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
            = x * cos + roll(x, d/2) * [-sin1, sin2]

which gives Megatron's values bit for bit (the same products and sum). Cases it does not
cover (fused kernels, interleaved or MLA rotations, YaRN's ``mscale``, context parallelism,
packed rows whose segments restart their positions) go to Megatron's function unchanged.
"""

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rope_utils

_megatron_apply = rope_utils.apply_rotary_pos_emb
_tables = None  # (freqs, rows, dtype, inference, cos, signed sin) of the last call


def _rows(t, freqs, cu_seqlens):
    """The number of leading ``freqs`` rows the tokens of ``t`` use, in order, or None when
    the positions are not a prefix of ``freqs`` (Megatron's function then decides)."""
    if cu_seqlens is None:
        return freqs.shape[0] if freqs.shape[0] == t.shape[0] else None  # sbhd: one row per position
    tokens = t.shape[0]
    if cu_seqlens.numel() == 2 or freqs.shape[0] == tokens:
        # one segment (positions 0..t-1), or a frequency row per packed token (Megatron's
        # exact mapping); both read freqs[:t] when the segments cover the row
        return tokens if int(cu_seqlens[-1]) == tokens and freqs.shape[0] >= tokens else None
    return None


def _covered(config, mscale, cp_group, freqs) -> bool:
    if config.apply_rope_fusion or config.rotary_interleaved or config.multi_latent_attention:
        return False
    if mscale != 1.0 or freqs.requires_grad or freqs.shape[-1] % 2:
        return False
    cp = cp_group.size() if cp_group is not None else parallel_state.get_context_parallel_world_size()
    return cp == 1


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
    """Megatron's ``apply_rotary_pos_emb`` (same signature and values), see the module doc."""
    global _tables
    rows = _rows(t, freqs, cu_seqlens) if _covered(config, mscale, cp_group, freqs) else None
    if rows is None:
        return _megatron_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    inference = torch.is_inference_mode_enabled()
    cached = _tables
    if cached is not None and cached[0] is freqs and cached[1:4] == (rows, t.dtype, inference):
        cos, sin = cached[4:]
    else:
        f = freqs[:rows]
        if cu_seqlens is not None:
            f = f.squeeze(1)  # [t, 1, rot]: thd has no batch dimension
        half = f.shape[-1] // 2
        cos = torch.cos(f).to(t.dtype)
        sin = torch.sin(f)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(t.dtype)
        _tables = (freqs, rows, t.dtype, inference, cos, sin)
    rot = cos.shape[-1]
    x = t if rot == t.shape[-1] else t[..., :rot]
    out = x * cos + x.roll(rot // 2, dims=-1) * sin
    return out if rot == t.shape[-1] else torch.cat((out, t[..., rot:]), dim=-1)


def install() -> None:
    """Use :func:`apply_rotary_pos_emb` in Megatron's attention (idempotent)."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
