"""Sequence log-probs, and the reference policy's, for the DPO family and KTO.

The reference policy is the frozen initial model. Two ways to get its log-probs
(``model.<algo>.ref_logprobs``):

- ``precompute``: one forward-only pass over the dataset with the initial weights before
  training; each sample keeps its reference log-prob sums (``dataset.ref_logps``) and the
  batches carry them. No reference forward during training.
- ``swap``: a CPU copy of the initial weights (:class:`ReferenceWeights`) is exchanged with
  the live parameters for a no-grad forward over each step's micro-batches, then exchanged
  back. Costs one extra forward per step and one parameter-sized copy in CPU memory, but
  nothing per sample (for datasets too large or too dynamic to precompute).

Both run the same forward-only pipeline schedule as training, so they work at any
TP/PP/DP layout and give the values the training forward would give.
"""

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from nemo_aligner.data.loader import token_budget_chunks
from nemo_aligner.models.collect import forward_only_collect
from nemo_aligner.models.forward import loss_positions, rows_of_logits
from nemo_aligner.models.logprobs import token_logprobs
from nemo_aligner.models.lora import adapters_disabled, has_lora, reference_context
from nemo_aligner.utils.distributed import is_global_rank_zero

REFERENCE_MODES = ("precompute", "swap")


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """``out[k] = sum of values[t] over the tokens t of sequence k`` (``seq_ids[t] == k``;
    tokens with ``seq_ids == -1`` must carry 0). Differentiable w.r.t. ``values``."""
    ids = seq_ids.reshape(-1).to(values.device).clamp(min=0)
    return values.new_zeros(num_sequences).index_add(0, ids, values.reshape(-1))


def sequence_logps(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token log-probs, and response-token counts.

        logp_k = sum_{t in seq k} mask_t log p(label_t),     n_k = sum_{t in seq k} mask_t

    ``logits``: ``[rows, s, V/tp]`` (vocab-parallel, exact under TP), or ``[K, V/tp]`` at
    :func:`~nemo_aligner.models.forward.loss_positions` only (``forward_batch(...,
    logits_at=loss_positions(batch))``); ``batch`` from
    :func:`nemo_aligner.data.preference.group_collate`. Returns two float32 ``[S]`` tensors.
    """
    labels, mask, seq_ids = rows_of_logits(logits, batch, "labels", "loss_mask", "seq_ids")
    logp = token_logprobs(logits, labels.to(logits.device), inplace=True)
    mask = mask.to(logp.device, logp.dtype)
    n = len(batch["last_index"])
    return sequence_sums(logp * mask, seq_ids, n), sequence_sums(mask, seq_ids, n)


def _reference_sums(logits, batch):
    return sequence_logps(logits, batch)[0].detach().cpu()


@torch.no_grad()
def precompute_reference_logps(model_chunks, dataset, base_dataset, collate_fn, micro_batch_size: int,
                               desc: str = "reference log-probs", items=None, row_length=None,
                               token_budget=None) -> None:
    """Fill ``base_dataset.ref_logps`` (``[N, 2]``) with the current weights' log-prob sums.

    ``dataset`` yields groups of ``base_dataset``'s samples (the dataset itself, or its
    packs); ``items`` are the indices of ``dataset`` to compute (default: all of them; the
    samples of the others keep NaN, so using one by mistake shows as a NaN loss). Data-parallel
    ranks split the items, every rank ends with all the values. Must be called by every rank.
    Micro-batches are ``micro_batch_size`` items, or with ``token_budget`` and ``row_length``
    (one-row micro-batches) the runs of items that fit in the budget, as in training.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    items = sorted(set(range(len(dataset)) if items is None else items))
    mine = items[dp_rank::dp_size]
    values = torch.zeros(len(base_dataset), 2, dtype=torch.float64)
    computed = torch.zeros(len(base_dataset), dtype=torch.float64)
    bar = tqdm(total=len(mine), desc=desc, unit="samples", disable=not is_global_rank_zero(), dynamic_ncols=True)
    for chunk in _micro_batches(dataset, mine, micro_batch_size, row_length, token_budget):
        batch = collate_fn(chunk)
        with reference_context(model_chunks):  # a LoRA model's reference: its adapters off
            sums = forward_only_collect(model_chunks, [batch], _reference_sums, logits_at=loss_positions)
        if sums is not None:
            values[batch["sample_ids"]] = sums[0].view(-1, 2).double()
            computed[batch["sample_ids"]] = 1.0
        bar.update(len(chunk))
    if dist.is_initialized():
        # Each sample is computed once, on one data-parallel rank's last pipeline stage.
        for tensor in (values, computed):
            dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
            dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
    bar.close()
    values[computed == 0] = float("nan")
    base_dataset.ref_logps.copy_(values.float())


def reference_token_budget(training_budget: int, small: int = 4096) -> int:
    """Tokens a forward-only reference micro-batch may hold, given the training one's.

    Twice the training budget: with no activations kept for a backward, that holds less
    memory than a training micro-batch (its logits and their gradient alone). A small budget
    is raised to four times, up to ``small`` tokens: each forward costs a fixed overhead
    (tens of ops per layer, the micro-batch's collation) that short rows do not amortize,
    ~15% of the pass at 512 training tokens; the extra memory is then that of a few thousand
    tokens, before the optimizer's moments exist.
    """
    return max(2 * training_budget, min(4 * training_budget, small))


def _micro_batches(dataset, indices, micro_batch_size, row_length, token_budget, window: int = 1024):
    """Lists of ``dataset`` items, ``micro_batch_size`` at a time or filled to ``token_budget``;
    items are made a window at a time, not all at once (a dataset may be large)."""
    for w in range(0, len(indices), window):
        items = [dataset[i] for i in indices[w : w + window]]
        if token_budget is not None and row_length is not None:
            yield from token_budget_chunks(items, row_length, token_budget)
        else:
            yield from (items[j : j + micro_batch_size] for j in range(0, len(items), micro_batch_size))


def items_used(sampler, steps: int, start: int = 0) -> list[int]:
    """The dataset indices ``sampler`` gives every data-parallel rank over ``steps`` global
    batches from ``consumed_samples == start`` (what a run of that many steps reads)."""
    import copy

    probe = copy.copy(sampler)
    probe.consumed_samples = start
    used = []
    for step, global_batch in enumerate(_global_batches(probe)):
        if step >= steps:
            break
        used.extend(global_batch)
    return used


def _global_batches(sampler):
    """Whole global batches (all data-parallel ranks), in the order the sampler yields them."""
    while True:
        epoch, begin = divmod(sampler.consumed_samples, sampler.samples_per_epoch)
        for batch in sampler._global_batches(epoch, begin):
            sampler.consumed_samples += len(batch)
            yield batch


class ReferenceWeights:
    """The initial parameters of this rank's model chunks, kept in CPU memory.

    :meth:`swapped` exchanges them with the live parameters (tensor by tensor, through one
    temporary the size of a single parameter) and exchanges them back on exit, so the
    policy's weights, gradients and optimizer state are untouched.
    """

    def __init__(self, model_chunks):
        chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.cpu = [p.detach().to("cpu", copy=True) for p in self.params]

    @torch.no_grad()
    def _exchange(self) -> None:
        for param, stored in zip(self.params, self.cpu):
            live = param.detach().clone()
            param.copy_(stored)
            stored.copy_(live)

    @contextlib.contextmanager
    def swapped(self):
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def refresh(self) -> None:
        """Keep the live weights as the new reference (SPIN's end of an iteration)."""
        for param, stored in zip(self.params, self.cpu):
            stored.copy_(param.detach())

    def sharded_state_dict(self, model_chunks, prefix: str = "reference_policy.") -> dict:
        """The stored weights as the model's sharded state (checkpoint keys under ``prefix``),
        for ``save_checkpoint(extra=...)``. Built with them swapped in, from copies, so the live
        weights stay the policy's; a LoRA model's filter applies (only its adapters change)."""
        from dataclasses import replace

        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        from nemo_aligner.checkpoint.distributed import _model_sharded_state_dict

        with self.swapped():
            sharded = _model_sharded_state_dict(model_chunks)
            return {name: replace(value, key=prefix + value.key, data=value.data.detach().clone())
                    for name, value in sharded.items() if isinstance(value, (ShardedTensor, ShardedTensorFactory))}

    def load(self, path, model_chunks, name: str = "reference_policy", prefix: str = "reference_policy.") -> None:
        """Set the stored weights from checkpoint ``path`` (what :meth:`sharded_state_dict` wrote)."""
        from nemo_aligner.checkpoint.distributed import CheckpointError, _unwrap, load_extra

        state = load_extra(path, name, self.sharded_state_dict(model_chunks, prefix))
        module = _unwrap(model_chunks[0] if isinstance(model_chunks, list) else model_chunks)
        with self.swapped():  # loads into the live tensors, which the exit swaps back into the store
            result = module.load_state_dict(state, strict=False)
        keep = getattr(module, "checkpoint_key_filter", lambda key: True)
        missing = [k for k in result.missing_keys if keep(k) and not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{path}: its {name} lacks {len(missing)} tensors of this model (first: {missing[0]})")


class AdapterReference:
    """The reference of a LoRA model: the same weights with the adapters switched off (no copy).
    Has :class:`ReferenceWeights`' interface."""

    def __init__(self, model_chunks):
        self.model = model_chunks[0] if isinstance(model_chunks, list) else model_chunks

    def swapped(self):
        return adapters_disabled(self.model)


def reference_for(model_chunks):
    """The reference policy of a run: :class:`AdapterReference` for a LoRA model, else the
    initial weights kept on CPU (:class:`ReferenceWeights`)."""
    chunk = model_chunks[0] if isinstance(model_chunks, list) else model_chunks
    return AdapterReference(chunk) if has_lora(chunk) else ReferenceWeights(model_chunks)


def attach_reference_logps(reference: ReferenceWeights, model_chunks, micro_batches: list[dict]) -> None:
    """Swap mode: set ``batch["ref_logps"]`` on every micro-batch (on the last pipeline stage,
    the only one computing losses) from a no-grad forward with the reference weights."""
    with reference.swapped():
        attach_logps(model_chunks, micro_batches)


def attach_logps(model_chunks, micro_batches: list[dict]) -> None:
    """Set ``batch["ref_logps"]`` (the per-sequence log-prob sums of the current weights) on
    every micro-batch, on the last pipeline stage."""
    sums = forward_only_collect(model_chunks, micro_batches, _reference_sums, logits_at=loss_positions)
    if sums is not None:
        for batch, values in zip(micro_batches, sums):
            batch["ref_logps"] = values
