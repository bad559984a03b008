"""Reward heads on the Megatron-Core GPT.

:class:`GPTRewardModel` is a ``GPTModel`` whose last pipeline stage ends in a
:class:`RewardHead` instead of the vocabulary projection: after the final norm, each token
position ``t`` gets

    r_t = W h_t + b,        W: [num_attributes, hidden],  b: [num_attributes]

(``b`` only for regression models: a Bradley-Terry loss depends on reward differences, so a
bias gets an exactly-zero gradient there and would only drift with rounding noise under Adam).

returned as ``[batch, seq, num_attributes]`` float32 (every TP rank holds the full value).
:func:`sequence_rewards` turns the per-token values into one reward per sequence:

- ``last``: ``r = r_T`` at the sequence's last real token (the end-of-response token);
- ``mean``: ``r = (1/T) sum_t r_t``, which equals ``W (1/T sum_t h_t) + b``: the head
  applied to the mean hidden state, since the head is affine.

Computing the head at every position costs ``hidden * num_attributes`` per token (nothing
next to a layer) and keeps the model's forward free of per-sequence bookkeeping, so packed
and pipeline-parallel batches need nothing special.

The head is a ``RowParallelLinear`` (weight split along the hidden dimension over tensor
parallelism, outputs all-reduced), so it shards and reshards in ``dist_checkpointing`` like
any Megatron layer (keys ``reward_head.weight``, ``reward_head.bias``). Its dtype can differ
from the backbone's (e.g. a float32 head on a bf16 model).
"""

import copy

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import RowParallelLinear, gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

REDUCTIONS = ("last", "mean")


class RewardHead(RowParallelLinear):
    """``[s, b, hidden]`` final-norm hidden states -> ``[b, s, num_attributes]`` rewards."""

    def __init__(self, config, num_attributes: int, dtype: torch.dtype | None = None, bias: bool = True):
        # Its own config: the head runs on the full sequence (gathered when sequence parallel)
        # and may have its own parameter dtype.
        head_config = copy.copy(config)
        head_config.sequence_parallel = False
        if dtype is not None:
            head_config.params_dtype = dtype
        super().__init__(
            config.hidden_size, num_attributes, config=head_config, init_method=config.init_method,
            bias=bias, input_is_parallel=False, skip_bias_add=False,
        )
        self.gather_sequence = bool(config.sequence_parallel)

    def forward(self, hidden_states):
        if self.gather_sequence:
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        rewards, _ = super().forward(hidden_states.to(self.weight.dtype))
        return rewards.transpose(0, 1).float()


class GPTRewardModel(GPTModel):
    """A ``GPTModel`` ending in a :class:`RewardHead` (built by
    :func:`nemo_aligner.models.gpt.build_gpt_model` with ``model_class=GPTRewardModel``).

    Same constructor as ``GPTModel`` plus ``num_attributes``, ``head_dtype`` and
    ``head_bias``; the input and output embeddings are never tied (there is no output
    embedding). Non-final pipeline stages are plain GPT stages.
    """

    def __init__(self, *args, num_attributes: int = 1, head_dtype: torch.dtype | None = None,
                 head_bias: bool = True, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        self.num_attributes = int(num_attributes)
        if self.post_process:
            del self.output_layer  # the vocabulary projection is replaced, not kept unused
            self.reward_head = RewardHead(self.config, self.num_attributes, head_dtype, bias=head_bias)

    def _postprocess(self, hidden_states, **kwargs):
        if not self.post_process:
            return hidden_states
        return self.reward_head(hidden_states)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # GPTModel's and LanguageModule's versions only add output-layer handling (tying,
        # vocabulary padding), and fail without an output layer; the generic one is exact.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)


def sequence_rewards(token_rewards: torch.Tensor, batch: dict, reduction: str = "last") -> torch.Tensor:
    """One reward per sequence, ``[num_sequences, num_attributes]``.

    ``token_rewards`` is ``[rows, s, A]``; ``batch`` carries ``last_index`` (flat index of each
    sequence's last token) and ``seq_ids`` (sequence of each token, -1 on padding), as made
    by :func:`nemo_aligner.data.preference.group_collate` for packed and unpacked batches.
    """
    flat = token_rewards.reshape(-1, token_rewards.shape[-1])
    if reduction == "last":
        return flat[batch["last_index"].to(flat.device)]
    if reduction == "mean":
        ids = batch["seq_ids"].reshape(-1).to(flat.device)
        real = (ids >= 0).to(flat.dtype)
        n = len(batch["last_index"])
        totals = flat.new_zeros(n, flat.shape[-1]).index_add(0, ids.clamp(min=0), flat * real[:, None])
        counts = flat.new_zeros(n).index_add(0, ids.clamp(min=0), real)
        return totals / counts.clamp(min=1)[:, None]
    raise ValueError(f"model.reward_reduction={reduction!r}; choose one of {REDUCTIONS}")
