"""KV-cached generation on a Megatron-Core ``GPTModel`` (CPU and GPU, any TP size).

Why not Megatron-Core's own engines: its ``StaticInferenceEngine`` / text generation
controller draw all samples from one shared generator (no per-sample seeds, so a sample
depends on the batch it ran in), create CUDA tensors and events directly, and feed prompts
of different lengths token by token after the shortest one. This module writes a lean loop
instead:

- one prefill forward over the whole (left-padded) batch, then one forward per new token
  over the whole batch; pad keys are masked out and each row's rotary angles (or learned
  position ids) come from its own positions ``0, 1, ...``, so a row computes what a run of
  that prompt alone computes;
- only the last position's logits are materialized (``[B, V]``, gathered over TP for
  sampling); sampling and log-probs use the real vocabulary (padded ids are never drawn);
- finished rows are dropped from the batch and the KV cache once a quarter of the batch
  has finished, so they stop costing work.

Two interchangeable decoders run the model with a KV cache (``decoder=``):
:class:`~nemo_aligner.generation.lean_decoder.LeanDecoder` (``"lean"``, a lean forward over
the model's own parameters for the local layer spec; the fast one on CPU) and
:class:`~nemo_aligner.generation.context_decoder.MegatronContextDecoder` (``"megatron"``,
``GPTModel.forward`` with Megatron's ``StaticInferenceContext``; works with any layer spec).
``"auto"`` takes the lean one where it applies.

Weights: by default the engine runs on the training model itself (``refit`` is free);
:meth:`MegatronEngine.with_own_weights` builds a separate copy (e.g. another dtype) that
``refit`` overwrites in place. Pipeline parallelism: the engine's model holds every layer;
under a pipeline-parallel trainer ``with_own_weights`` folds the stages into data
parallelism (every pipeline rank holds the whole model and generates its own prompts; refit
gathers the layers from their stages), see :mod:`nemo_aligner.generation.refit`.
"""

import contextlib

import torch
from megatron.core import parallel_state

from nemo_aligner.generation.context_decoder import MegatronContextDecoder
from nemo_aligner.generation.engine import (
    GenerationError,
    GenerationOutput,
    RolloutEngine,
    SamplingParams,
)
from nemo_aligner.generation.lean_decoder import LeanDecoder, PackedOutputProduct, unsupported_reason
from nemo_aligner.generation.refit import (
    PipelineGatherCopier,
    WeightCopier,
    folded_process_groups,
    unwrap_model,
)
from nemo_aligner.generation.sampling import choose_next_tokens, row_uniforms
from nemo_aligner.generation.stopping import StopStringMatcher
from nemo_aligner.models.attention import SDPACoreAttention


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout) for a generate call; the caller's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


DECODERS = ("auto", "lean", "megatron")
# A call generating at least this many tokens per prompt packs a large output weight for
# oneDNN (~20 ms at 32000 x 256, repaid by ~1.5 ms per step).
_PACK_MIN_STEPS = 32


class MegatronEngine(RolloutEngine):
    """Generation on a Megatron-Core ``GPTModel`` holding every layer.

    Args:
        model: the GPT (or a DDP wrapper of it) to generate with; shared, not copied.
        tokenizer: one of :mod:`nemo_aligner.data.tokenizers`; needed for text prompts,
            decoded texts and stop strings.
        vocab_size: the tokenizer's vocabulary size; ids at or above it (the padding of the
            embedding table) are never sampled and are excluded from the log-prob
            normalizer. Defaults to ``tokenizer.vocab_size``.
        eos_id / pad_id: default to the tokenizer's.
        add_bos: prepend BOS to text prompts.
        max_sequence_length: prompt + ``max_new_tokens`` must fit (defaults to the model's
            ``max_sequence_length``).
        max_batch_size: prompts are generated in chunks of this many (sorted by length so
            a chunk pads little).
        decoder: ``"auto"``, ``"lean"`` or ``"megatron"`` (see the module docstring).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        vocab_size: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        max_sequence_length: int | None = None,
        max_batch_size: int = 64,
        decoder: str = "auto",
    ):
        self.model = unwrap_model(model)
        if not (self.model.pre_process and self.model.post_process):
            raise GenerationError(
                "MegatronEngine needs a model holding every layer; under pipeline parallelism build "
                "it with MegatronEngine.with_own_weights(model_cfg, training_model), which folds the "
                "pipeline stages into data parallelism for generation"
            )
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))
        if add_bos and getattr(tokenizer, "bos_id", None) is None:
            raise GenerationError("add_bos=True but the tokenizer has no BOS token; set add_bos=False")
        self.add_bos = add_bos
        self.max_sequence_length = int(max_sequence_length or self.model.max_sequence_length)
        self.max_batch_size = int(max_batch_size)
        self._copier = None  # set when the engine holds its own weights
        if decoder not in DECODERS:
            raise GenerationError(f"decoder={decoder!r}; choose one of {DECODERS}")
        reason = unsupported_reason(self.model)
        if decoder == "lean" and reason is not None:
            raise GenerationError(f"the lean decoder does not support {reason}; use decoder='megatron'")
        self.decoder = "lean" if decoder == "lean" or (decoder == "auto" and reason is None) else "megatron"
        # Padding masks reach only our SDPA attention; other core attentions (Transformer
        # Engine's) follow Megatron's mask type, so they get batches without padding.
        self.equal_length_batches = self.decoder == "megatron" and any(
            type(layer.self_attention.core_attention) is not SDPACoreAttention for layer in self.model.decoder.layers
        )

    # ----------------------------------------------------------------- weights
    @classmethod
    def with_own_weights(cls, model_cfg, source_model, tokenizer=None, *, precision=None, **kwargs):
        """An engine holding its own copy of ``source_model``'s weights.

        ``model_cfg`` is the source's ``model.*`` config (at the current TP size);
        ``precision`` overrides its dtype (e.g. ``"bf16"`` for a float32 trainer). The copy
        is allocated once; :meth:`refit` overwrites it in place.

        Under pipeline parallelism (collective over the pipeline group) the copy holds every
        layer on every pipeline rank, gathered from the stages at each refit: the stages are
        folded into data parallelism for generation, each stage's TP group generating its
        own prompts (see :class:`~nemo_aligner.generation.refit.PipelineGatherCopier`).
        """
        from nemo_aligner.models.gpt import build_gpt_model

        cfg = dict(model_cfg)
        if precision is not None:
            cfg["precision"] = precision
        vocab = cfg.get("vocab_size") or kwargs.get("vocab_size") or tokenizer.vocab_size
        folded = parallel_state.get_pipeline_model_parallel_world_size() > 1
        extra = {}
        if folded:  # every layer on every pipeline rank (see nemo_aligner.generation.refit)
            cfg["pipeline_model_parallel_size"] = 1
            extra["pg_collection"] = folded_process_groups()
        # No initialization: refit overwrites every weight right away.
        own = build_gpt_model(cfg, int(vocab), pre_process=True, post_process=True, initialize=False, **extra)
        for p in own.parameters():
            p.requires_grad_(False)
        engine = cls(own, tokenizer, **kwargs)
        engine._copier = PipelineGatherCopier(own) if folded else WeightCopier(own)
        engine.refit(source_model)
        return engine

    @property
    def owns_weights(self) -> bool:
        return self._copier is not None

    def refit(self, model) -> None:
        """Generate with ``model``'s current weights.

        Shared weights (the engine was built on ``model``): nothing to do, the engine reads
        the very tensors the optimizer updates. Own weights: copied in place into the
        engine's preallocated tensors (``data_ptr`` never changes).
        """
        source = unwrap_model(model)
        if self._copier is None:
            if source is not self.model:
                raise GenerationError(
                    "this engine shares its model's weights and cannot refit from another "
                    "model; build it with MegatronEngine.with_own_weights to hold a copy"
                )
            return
        self._copier.copy_from(source)

    def free(self) -> None:
        """Drop the engine's own weight copy (a shared model is left to its owner)."""
        self._copier = None
        self.model = None

    # ----------------------------------------------------------------- inputs
    def _prompt_ids(self, prompts) -> list[list[int]]:
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise GenerationError("text prompts need a tokenizer; build the engine with tokenizer=...")
                row = ([self.tokenizer.bos_id] if self.add_bos else []) + self.tokenizer.text_to_ids(prompt)
            else:
                row = [int(t) for t in (prompt.tolist() if torch.is_tensor(prompt) else prompt)]
            if not row:
                raise GenerationError(f"prompt {i} is empty; give at least one token (or set add_bos)")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(
                    f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {self.vocab_size}); "
                    "tokenize prompts with the model's tokenizer"
                )
            ids.append(row)
        return ids

    def _check_lengths(self, ids, params: SamplingParams) -> None:
        limit = self.max_sequence_length - params.max_new_tokens
        if limit < 1:
            raise GenerationError(
                f"sampling.max_new_tokens={params.max_new_tokens} leaves no room for a prompt: the "
                f"model holds {self.max_sequence_length} positions; lower sampling.max_new_tokens"
            )
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise GenerationError(
                    f"prompt {i} has {len(row)} tokens; with sampling.max_new_tokens="
                    f"{params.max_new_tokens} prompts may have at most {limit} tokens (the model "
                    f"holds {self.max_sequence_length} positions); shorten the prompt or lower "
                    "sampling.max_new_tokens"
                )

    # ----------------------------------------------------------------- generate
    def generate(self, prompts, sampling_params: SamplingParams, seeds=None) -> GenerationOutput:
        if self.model is None:
            raise GenerationError("the engine was freed; build a new one")
        params = sampling_params
        ids = self._prompt_ids(prompts)
        if seeds is None:
            seeds = [params.seed + i for i in range(len(ids))]
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(ids):
            raise GenerationError(f"got {len(seeds)} seeds for {len(ids)} prompts; give one seed per prompt")
        self._check_lengths(ids, params)
        stops = StopStringMatcher(self.tokenizer, params.stop_strings)
        # The lean decoder's output weight packed once for the whole call (all chunks), where
        # enough steps repay the reorder (see PackedOutputProduct).
        packs = self.decoder == "lean" and params.max_new_tokens >= _PACK_MIN_STEPS
        output_product = PackedOutputProduct() if packs else None

        n, width = len(ids), params.max_new_tokens
        tokens = torch.full((n, width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(n, width)
        sampling_logprobs = torch.zeros(n, width)
        lengths = torch.zeros(n, dtype=torch.long)
        is_end = torch.zeros(n, dtype=torch.bool)
        for chunk in self._chunks(ids):
            out = self._generate_chunk([ids[i] for i in chunk], params, [seeds[i] for i in chunk], stops, output_product)
            index = torch.tensor(chunk)
            for dst, src in zip((tokens, logprobs, sampling_logprobs, lengths, is_end), out):
                dst[index] = src.cpu()
        longest = int(lengths.max()) if n else 0
        result = GenerationOutput(
            prompt_ids=ids,
            response_tokens=tokens[:, :longest].contiguous(),
            response_lengths=lengths,
            logprobs=logprobs[:, :longest].contiguous(),
            sampling_logprobs=sampling_logprobs[:, :longest].contiguous(),
            is_end=is_end,
        )
        if self.tokenizer is not None:
            result.texts = [self.tokenizer.ids_to_text(r) for r in result.response_ids]
        return result

    def _chunks(self, ids) -> list[list[int]]:
        """Prompt indices per batch: longest first, so a batch pads little (none at all with
        ``equal_length_batches``)."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        groups = [order]
        if self.equal_length_batches:
            groups = [[i for i in order if len(ids[i]) == n] for n in sorted({len(r) for r in ids}, reverse=True)]
        return [g[s:s + self.max_batch_size] for g in groups for s in range(0, len(g), self.max_batch_size)]

    def _end_ids(self, params: SamplingParams, device) -> torch.Tensor:
        ends = [self.eos_id] if self.eos_id is not None else []
        ends += [t for t in params.stop_token_ids if t not in ends]
        return torch.tensor(ends, dtype=torch.long, device=device)

    @torch.inference_mode()
    def _generate_chunk(self, ids, params: SamplingParams, seeds, stops, output_product=None):
        """Generate for one chunk; returns per-row tensors in the chunk's order."""
        model = self.model
        device = next(model.parameters()).device
        b, width = len(ids), params.max_new_tokens
        lens = torch.tensor([len(r) for r in ids], device=device)
        prompt_len = int(lens.max())

        # Left padding: row r's prompt occupies slots pad[r] .. prompt_len - 1.
        prompt = torch.full((b, prompt_len), self.pad_id, dtype=torch.long, device=device)
        for r, row in enumerate(ids):
            prompt[r, prompt_len - len(row):] = torch.tensor(row, device=device)
        pad = prompt_len - lens
        slot = torch.arange(prompt_len + width, device=device)
        positions = (slot.unsqueeze(0) - pad.unsqueeze(1)).clamp_(min=0)  # [b, slots]
        key_valid = slot.unsqueeze(0) >= pad.unsqueeze(1)  # [b, slots]

        end_ids = self._end_ids(params, device)
        # Each row's uniform draws for its whole response, from its own seed.
        uniforms = None if params.greedy else row_uniforms([torch.Generator().manual_seed(s) for s in seeds], width)
        # Results in chunk order. The live batch writes into its own buffers (plain column
        # writes each step); rows are copied out when they leave the batch and at the end.
        out = [torch.full((b, width), self.pad_id, dtype=torch.long, device=device),
               torch.zeros(b, width, device=device), torch.zeros(b, width, device=device)]
        lengths = torch.full((b,), width, dtype=torch.long, device=device)
        is_end = torch.zeros(b, dtype=torch.bool, device=device)
        live = [torch.empty_like(buffer) for buffer in out]  # tokens, logprobs, sampling logprobs
        # A live row's length: the step it ended at + 1, or ``width`` while it runs.
        live_len = torch.full((b,), width, dtype=torch.long, device=device)
        live_end = torch.zeros(b, dtype=torch.bool, device=device)
        rows = torch.arange(b, device=device)  # chunk row of each live batch row
        active = torch.ones(b, dtype=torch.bool, device=device)
        banned = torch.ones(b, dtype=torch.bool, device=device)
        n_active = b

        def flush(select):
            for dst, src in zip(out, live):
                dst[rows[select]] = src[select]
            lengths[rows[select]], is_end[rows[select]] = live_len[select], live_end[select]

        if self.decoder == "lean":
            decoder = LeanDecoder(model, positions, key_valid, self.vocab_size, output_product=output_product)
        else:
            decoder = MegatronContextDecoder(model, positions, key_valid, self.vocab_size)
        with _eval_mode(model), decoder:
            logits = decoder.prefill(prompt)
            for t in range(width):
                chosen = choose_next_tokens(
                    logits.float(), params, None if uniforms is None else uniforms[:, t],
                    banned[: rows.numel()] if t < params.min_new_tokens else None, end_ids,
                )
                for buffer, values in zip(live, chosen):
                    buffer[:, t] = values
                tok = chosen[0]
                # Per step only what finds ended rows; the bookkeeping runs when some did.
                ended = torch.isin(tok, end_ids) if end_ids.numel() else None
                if ended is not None and n_active < rows.numel():
                    ended &= active
                if stops and t + 1 >= params.min_new_tokens:
                    ended = torch.zeros_like(active) if ended is None else ended
                    for i in active.nonzero().squeeze(1).tolist():
                        if not ended[i] and stops.matches(live[0][i, : t + 1].tolist()):
                            ended[i] = True
                n_ended = 0 if ended is None else int(ended.sum())
                if n_ended:
                    live_len[ended] = t + 1
                    live_end |= ended
                    active &= ~ended
                    n_active -= n_ended
                if t == width - 1 or n_active == 0:
                    break
                if n_ended and n_active <= 0.75 * rows.numel():
                    flush((~active).nonzero().squeeze(1))
                    keep = active.nonzero().squeeze(1)
                    decoder.keep_rows(keep)
                    tok, rows, active = tok[keep], rows[keep], active[keep]
                    live = [buffer[keep] for buffer in live]
                    live_len, live_end = live_len[keep], live_end[keep]
                    if uniforms is not None:
                        uniforms = uniforms[keep]
                logits = decoder.step(tok)
            flush(torch.arange(rows.numel(), device=device))
        # Past its length a row holds what the batch computed after it ended: clear it.
        after = torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1)
        out[0].masked_fill_(after, self.pad_id)
        out[1].masked_fill_(after, 0.0)
        out[2].masked_fill_(after, 0.0)
        out_tokens, out_logprobs, out_sampling = out
        return out_tokens, out_logprobs, out_sampling, lengths, is_end
