"""Forward-only passes that keep a small result per micro-batch (reference log-probs,
rewards), at any tensor/pipeline-parallel layout."""

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_aligner.models.forward import forward_batch
from nemo_aligner.utils.cpu_support import cuda_on_cpu, native_torch


def schedule_shape(batch: dict) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` the pipeline schedule needs for ``batch``
    (a packed batch runs as one row, see :func:`~nemo_aligner.models.forward.forward_batch`)."""
    rows, width = batch["tokens"].shape
    return (rows * width, 1) if "cu_seqlens" in batch else (width, rows)


@torch.no_grad()
def forward_only_collect(model_chunks, micro_batches: list[dict], reduce_fn, logits_at=None) -> list | None:
    """Run Megatron's forward-only schedule over ``micro_batches`` (all of one shape) and
    return ``[reduce_fn(output, batch) for each micro-batch]`` on the last pipeline stage
    (``None`` on the other stages). ``output`` is the last stage's model output (logits or
    rewards); with ``logits_at(batch)`` (token indices) the logits at those tokens only (see
    :func:`~nemo_aligner.models.forward.forward_batch`). The chunks are put in eval mode for
    the pass and restored afterwards.
    """
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    collected = []

    def step(data_iterator, model):
        batch = next(data_iterator)
        with native_torch():
            out = forward_batch(model, batch, logits_at=logits_at(batch) if logits_at is not None else None)

        def keep(output):
            with native_torch():  # called inside the schedule's CUDA-redirect mode
                collected.append(reduce_fn(output, batch))
            return torch.zeros((), dtype=torch.float32), torch.tensor(1, dtype=torch.int), {}

        return out, keep

    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    seq_length, micro_batch_size = schedule_shape(micro_batches[0])
    try:
        with cuda_on_cpu():
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(micro_batches), model=chunks,
                num_microbatches=len(micro_batches), seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True,
            )
    finally:
        for chunk, training in zip(chunks, was_training):
            chunk.train(training)
    return collected if parallel_state.is_pipeline_last_stage() else None
