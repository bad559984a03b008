"""KV-cached decoding through ``GPTModel.forward`` and Megatron's ``StaticInferenceContext``.

This is the generic decoder: it runs the model's own modules, so it works with any layer
spec (Transformer Engine on GPU, LoRA-wrapped layers, ...). Megatron's static context
caches keys *before* rotary embedding and re-rotates the whole cache at every step, which
makes it slower on CPU than :mod:`nemo_aligner.generation.lean_decoder`; the engine uses
it wherever the lean decoder does not apply.

Rows are left-padded. Megatron rotates queries and keys by their cache slot, so during
decoding ``model.rotary_pos_emb`` is replaced by :class:`_RowPositionRotary`, which hands
the attention a ``[slots, B, 1, dim]`` table holding each row's own positions. Padding is
masked through ``attention_mask``, which :class:`SDPACoreAttention` honours; for other core
attentions the engine batches prompts of equal length only, so no mask is needed.
"""

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from nemo_aligner.generation.engine import GenerationError


class _RowPositionRotary(torch.nn.Module):
    """Stands in for ``model.rotary_pos_emb``: the model's rotary table re-indexed by each
    row's positions, ``[slots, B, 1, dim]``; the attention slices it by slot as it would
    the ``[slots, 1, 1, dim]`` original."""

    def __init__(self, inner, positions: torch.Tensor):
        super().__init__()
        self.inner = inner
        full = inner(positions.shape[1])  # [slots, 1, 1, dim]; positions < slots
        self.table = full[:, 0, 0, :][positions.t()].unsqueeze(2)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.table = self.table[:, index]

    def forward(self, max_seq_len, offset=0, packed_seq=False, cp_group=None):
        return self.table

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)


class MegatronContextDecoder:
    """Prefill + one-token steps over ``model`` with a ``StaticInferenceContext``.

    ``positions`` / ``key_valid`` ``[B, slots]``: each row's position at every cache slot and
    whether the slot holds a real token (False for left padding). Logits cover the real
    vocabulary, ``[B, vocab_size]``. Use as a context manager: the rotary stand-in is
    installed on entry and removed on exit.
    """

    def __init__(self, model, positions: torch.Tensor, key_valid: torch.Tensor, vocab_size: int):
        if model.config.sequence_parallel:
            raise GenerationError(
                "generation through GPTModel.forward does not support sequence_parallel=true; "
                "use the lean decoder (local layer spec) or turn sequence parallelism off"
            )
        self.model = model
        self.vocab_size = vocab_size
        self.positions, self.key_valid = positions, key_valid
        # Without padding no mask is passed: attention that ignores explicit masks
        # (Transformer Engine's, which follows Megatron's mask type) is then still exact.
        self.padded = bool((~key_valid).any())
        b, slots = positions.shape
        self.context = StaticInferenceContext(b, slots)
        self.rotary = (
            _RowPositionRotary(model.rotary_pos_emb, positions)
            if model.position_embedding_type == "rope" else None
        )
        self._original_rotary = None

    def __enter__(self):
        if self.rotary is not None:
            self._original_rotary = self.model.rotary_pos_emb
            self.model.rotary_pos_emb = self.rotary
        return self

    def __exit__(self, *exc):
        if self.rotary is not None:
            self.model.rotary_pos_emb = self._original_rotary

    def _run(self, tokens, position_ids, mask):
        logits = self.model(
            tokens, position_ids, attention_mask=mask, inference_context=self.context,
            runtime_gather_output=True,
        )
        self.context.sequence_len_offset += tokens.shape[1]
        return logits[:, -1, : self.vocab_size]

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, P]`` (left-padded) -> last-position logits ``[B, vocab_size]``."""
        p = tokens.shape[1]
        if not self.padded:
            return self._run(tokens, self.positions[:, :p], None)
        causal = torch.ones(p, p, dtype=torch.bool, device=tokens.device).tril_()
        # A pad query attends to itself only, which keeps its (unused) output finite.
        allowed = (causal & self.key_valid[:, None, :p]) | torch.eye(p, dtype=torch.bool, device=tokens.device)
        return self._run(tokens, self.positions[:, :p], ~allowed.unsqueeze(1))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``) at the next slot -> logits ``[B, vocab_size]``."""
        slot = self.context.sequence_len_offset
        mask = ~self.key_valid[:, None, None, : slot + 1] if self.padded else None
        return self._run(tokens.unsqueeze(1), self.positions[:, slot:slot + 1], mask)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop every row not in ``index`` from the batch and the KV cache."""
        memory = self.context.key_value_memory_dict
        for layer, (k, v) in memory.items():
            memory[layer] = (k[:, index], v[:, index])
        self.context.max_batch_size = int(index.numel())
        self.positions, self.key_valid = self.positions[index], self.key_valid[index]
        self.padded = bool((~self.key_valid).any())
        if self.rotary is not None:
            self.rotary.keep_rows(index)
