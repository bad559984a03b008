"""Forward passes of a (possibly tensor/pipeline parallel) GPT on collated batches."""

import contextlib
import weakref

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from nemo_aligner.models.gpt import uses_transformer_engine
from nemo_aligner.utils.cpu_support import cuda_on_cpu, native_torch


def loss_positions(batch: dict) -> torch.Tensor:
    """Flat indices, into the batch's ``rows x width`` tokens in row-major order, of the
    tokens whose label a loss reads (``loss_mask > 0``)."""
    return torch.nonzero(batch["loss_mask"].reshape(-1) > 0).squeeze(1)


def rows_of_logits(logits: torch.Tensor, batch: dict, *keys: str) -> list[torch.Tensor]:
    """``batch[key]`` for each key, lined up with ``logits``' tokens: as they are for full
    logits ``[b, s, V]``; flattened and taken at :func:`loss_positions` for logits ``[K, V]``
    (``forward_batch(..., logits_at=loss_positions(batch))``)."""
    values = [batch[key] for key in keys]
    if logits.dim() != 2:
        return values
    at = loss_positions(batch)
    return [value.reshape(-1).index_select(0, at) for value in values]


def forward_batch(model, batch: dict, logits_at: torch.Tensor | None = None):
    """Run ``model`` on a collated batch; returns logits ``[b, s, V/tp]`` (or hidden states
    on a non-final pipeline stage).

    ``logits_at`` (flat token indices, e.g. :func:`loss_positions`): the last stage returns
    logits ``[K, V/tp]`` at those tokens only. The output layer then runs on those tokens'
    hidden states alone, not on every prompt token's: for a large vocabulary the output layer
    and the log-softmax cost more than the transformer, and their ``[tokens, V]`` buffers are
    the largest of the step. Where it can (:func:`_last_layer_rows`), the last transformer
    layer already works on those tokens alone after its attention.

    A packed batch (with ``cu_seqlens``) is flattened to one row of ``b * s`` tokens in
    Megatron's ``thd`` layout, so attention and RoPE restart at every sample boundary.
    A packed batch with ``prefix_lens`` (segments continuing a shared prompt, see
    :func:`~nemo_aligner.data.datasets.sft_collate`) passes them to attention as
    ``packed_seq_params.prefix_lens``; RoPE positions come from ``position_ids`` (which restart
    at each segment, or continue a shared prompt).
    """
    if logits_at is None:
        return _forward(model, batch)
    gpt = _language_model(model)
    if gpt is None or not getattr(gpt, "post_process", True):
        return _forward(model, batch)  # hidden states for the next pipeline stage
    positions = logits_at.to(batch["tokens"].device)
    with _output_layer_rows(gpt, positions) as selected:
        out = _forward(model, batch)
    out = out.reshape(-1, out.shape[-1])
    return out if selected else out.index_select(0, positions)


def _language_model(model):
    """The GPT module under ``model``'s wrappers (DDP, LoRA), or None."""
    for _ in range(8):
        if hasattr(model, "output_layer"):
            return model
        model = getattr(model, "module", None)
        if model is None:
            return None
    return None


def _pick(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions`` (indices into ``b x s`` row-major) of ``x`` ``[s, b, ...]``, as
    ``[K, 1, ...]`` (Megatron's layout, one sequence of the K tokens)."""
    s, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b * s, *x.shape[2:]).index_select(0, positions).unsqueeze(1)


@contextlib.contextmanager
def _output_layer_rows(gpt, positions: torch.Tensor):
    """Within the block, ``gpt``'s output layer takes only the hidden states at ``positions``
    (yields True), except under sequence parallelism, where each rank holds a slice of the
    sequence, or with multi-token prediction, which reads the output layer too (yields False:
    the caller selects from the full logits)."""
    layer = gpt.output_layer
    if getattr(layer, "sequence_parallel", False) or getattr(gpt, "mtp_process", False):
        yield False
        return
    with _last_layer_rows(gpt, positions) as selected:
        if selected:
            yield True
            return

    def rows(module, args, kwargs):
        return (_pick(args[0], positions), *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(rows, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


@contextlib.contextmanager
def _last_layer_rows(gpt, positions: torch.Tensor):
    """Within the block, ``gpt``'s last transformer layer keeps only the tokens at
    ``positions`` from its attention output projection on (yields True; False where it
    cannot, and nothing changes).

    A token's output from the last layer feeds nothing but its own logits: the other tokens
    need only its keys and values, made before. So the attention output projection, the
    residual add, the MLP and the final norm run on the K loss tokens, not on every prompt
    token (forward and backward): a DPO pair's prompt is a quarter of its tokens, and the
    last layer of four is a quarter of the transformer's work. The output layer then gets
    the K rows as they are.

    Only for the plain decoder layer of the local spec (self-attention, a bias-dropout-add
    function, no cross-attention, no activation recomputation, which would rerun the layer
    without this block): it selects the rows at the output projection's input (a forward
    pre-hook) and takes the same rows of the residual in the bias-dropout-add.
    """
    decoder = getattr(gpt, "decoder", None)
    layers = getattr(decoder, "layers", None)
    layer = layers[-1] if layers is not None and len(layers) else None
    usable = (
        type(layer) is TransformerLayer
        and not uses_transformer_engine()
        and isinstance(layer.cross_attention, IdentityOp)
        and not isinstance(layer.self_attn_bda, torch.nn.Module)
        and layer.config.recompute_granularity is None
        and not layer.config.sequence_parallel
        and getattr(layer.self_attention, "linear_proj", None) is not None
    )
    if not usable:
        yield False
        return
    bda = layer.self_attn_bda

    def picking_bda(training, fused):
        add = bda(training, fused)
        return lambda x_with_bias, residual, prob: add(x_with_bias, _pick(residual, positions), prob)

    def rows(module, args):
        return (_pick(args[0], positions), *args[1:])

    handle = layer.self_attention.linear_proj.register_forward_pre_hook(rows)
    layer.self_attn_bda = picking_bda
    try:
        yield True
    finally:
        handle.remove()
        layer.self_attn_bda = bda


def _forward(model, batch: dict):
    tokens, position_ids = batch["tokens"], batch["position_ids"]
    if "cu_seqlens" not in batch:
        return model(tokens, position_ids, attention_mask=None)
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = tokens.shape
    cu = batch["cu_seqlens"].to(device=tokens.device, dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(batch["max_seqlen"]),
        max_seqlen_kv=int(batch["max_seqlen"]),
    )
    if "prefix_lens" in batch:
        params.prefix_lens = batch["prefix_lens"].tolist()
    positions = contextlib.nullcontext()
    te = uses_transformer_engine()
    if "prefix_lens" in batch or not te:
        positions = rope_at_positions(model, position_ids.reshape(-1))
        if not te:
            # RoPE reads the "padded" boundaries when they are set, and our attention does not:
            # one segment spanning the row, with a frequency row per token, is the same
            # rotation as restarting at each boundary, without Megatron's loop over segments
            # (tens of small ops per layer).
            whole = torch.tensor([0, b * s], dtype=torch.int32, device=tokens.device)
            params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = whole
    with positions:
        out = model(
            tokens.reshape(1, b * s),
            position_ids.reshape(1, b * s),
            attention_mask=None,
            packed_seq_params=params,
        )
    # (logits at selected tokens only, see forward_batch, come back as [1, K, V])
    return out.reshape(b, s, -1) if out.dim() == 3 and out.shape[:2] == (1, b * s) else out


_ROPES = weakref.WeakKeyDictionary()  # model -> its RotaryEmbedding modules


@contextlib.contextmanager
def rope_at_positions(model, position_ids: torch.Tensor):
    """Within the block, ``model``'s rotary embeddings give one frequency row per token, at
    ``position_ids`` (``[t]``), instead of rows ``0 .. max_seqlen - 1``.

    Megatron's ``thd`` RoPE restarts positions at every segment unless it gets a row per
    packed token (then it takes each segment's rows at the segment's offset), which is what
    a segment continuing a shared prompt (positions from the prompt's length) needs.
    """
    ropes = _ROPES.get(model)
    if ropes is None:  # a walk over every module: once per model, not at every forward
        ropes = _ROPES[model] = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    top = int(position_ids.max()) + 1
    for rope in ropes:
        def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None, _rope=rope):
            return type(_rope).forward(_rope, top, offset, packed_seq, cp_group)[position_ids.to(_rope.inv_freq.device)]

        rope.forward = forward
    try:
        yield
    finally:
        for rope in ropes:
            del rope.forward


@torch.no_grad()
def full_logits(model_chunks, tokens: torch.Tensor, position_ids: torch.Tensor | None = None):
    """Logits ``[b, s, V_padded]`` for ``tokens`` on every rank, at any TP/PP layout.

    Runs Megatron's forward-only pipeline schedule (one micro-batch), gathers the
    vocabulary shards over tensor parallelism and broadcasts the result from the last
    pipeline stage. Meant for evaluation and tests, not for training-time hot paths.
    """
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    b, s = tokens.shape
    if position_ids is None:
        position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    batch = {"tokens": tokens, "position_ids": position_ids}
    collected = []

    def step(data_iterator, model):
        with native_torch():
            out = forward_batch(model, next(data_iterator))

        def keep(logits):
            collected.append(gather_from_tensor_model_parallel_region(logits).float())
            return torch.zeros((), dtype=torch.float32), torch.tensor(1, dtype=torch.int), {}

        return out, keep

    for chunk in chunks:
        chunk.eval()
    with cuda_on_cpu():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=chunks,
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
        )
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return collected[0]
    holder = [collected[0] if collected else None]
    dist.broadcast_object_list(
        holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]
