"""The rollout engine on TensorRT-LLM: built once with refit enabled, refit every step.

UNTESTED HERE: TensorRT-LLM needs CUDA, and this project's CI machines have none. The
code follows the public APIs of ``megatron.core.export.trtllm`` (weight conversion and
engine build), ``tensorrt_llm.runtime.ModelRunner`` (generation) and TensorRT's
``trt.Refitter`` (weight refit); only the import guard is exercised by the test suite.
On CPU, and wherever TensorRT-LLM is missing, use
:class:`~nemo_aligner.generation.megatron_engine.MegatronEngine` (the default).

Flow, per tensor-parallel rank (the engine uses the training model's TP layout, PP=1):

1. ``TRTLLMHelper.get_trtllm_pretrained_config_and_model_weights(...,
   on_device_distributed_conversion=True)`` converts this rank's weights;
2. ``build_and_save_engine(..., use_refit=True)`` builds ``rank{r}.engine`` into
   ``engine_dir`` (once);
3. ``ModelRunner.from_dir(engine_dir, rank=r)`` loads it for generation;
4. ``refit(model)`` converts the current weights again and writes them into the loaded
   engine through ``trt.Refitter`` (device pointers, no rebuild).

Log-probs: ``sampling_logprobs`` are TensorRT-LLM's (of the distribution it sampled from);
``logprobs`` (the unmodified model distribution, what PPO needs) are recomputed with a
cache-free forward of the training model (:func:`trainer_logprobs`), so they equal the
trainer's by construction.
"""

import torch
from megatron.core import parallel_state

from nemo_aligner.generation.consistency import trainer_logprobs
from nemo_aligner.generation.engine import (
    GenerationError,
    GenerationOutput,
    MissingDependencyError,
    RolloutEngine,
    SamplingParams,
)
from nemo_aligner.generation.refit import unwrap_model

MISSING = (
    "TensorRT-LLM is not installed; pip install tensorrt_llm (CUDA only, see "
    "https://nvidia.github.io/TensorRT-LLM/installation/) or use the megatron engine "
    "(generation.engine=megatron, MegatronEngine)"
)


def _import_trtllm():
    try:
        import tensorrt as trt
        import tensorrt_llm
        from tensorrt_llm.runtime import ModelRunner
    except ImportError as e:
        raise MissingDependencyError(f"{MISSING} ({e})") from None
    return trt, tensorrt_llm, ModelRunner


class TRTLLMEngine(RolloutEngine):
    """:class:`RolloutEngine` on a TensorRT-LLM engine built from a Megatron GPT.

    Args:
        model: the training GPT (PP=1 chunk; TP as in training).
        model_cfg: its ``model.*`` config (architecture keys).
        tokenizer: for text prompts and decoded responses.
        engine_dir: where ``rank{r}.engine`` is written.
        max_input_len / max_output_len / max_batch_size: the engine's build limits.
    """

    def __init__(self, model, model_cfg: dict, tokenizer, engine_dir, *, max_input_len=1024,
                 max_output_len=1024, max_batch_size=64, eos_id=None, pad_id=None):
        trt, tensorrt_llm, ModelRunner = _import_trtllm()
        if not torch.cuda.is_available():
            raise GenerationError("TensorRT-LLM needs a CUDA GPU; on CPU use MegatronEngine")
        from megatron.core.export.data_type import DataType
        from megatron.core.export.model_type import ModelType
        from megatron.core.export.trtllm.trtllm_helper import TRTLLMHelper

        self._trt = trt
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.vocab_size = int(model_cfg.get("vocab_size") or tokenizer.vocab_size)
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_id
        self.pad_id = pad_id if pad_id is not None else tokenizer.pad_id
        self.max_input_len, self.max_output_len = int(max_input_len), int(max_output_len)
        llama_like = str(model_cfg.get("position_embedding_type", "rope")) == "rope"
        self._dtype = {torch.bfloat16: DataType.bfloat16, torch.float16: DataType.float16}.get(
            self.model.config.params_dtype, DataType.float32
        )
        self._helper = TRTLLMHelper(
            transformer_config=self.model.config,
            model_type=ModelType.llama if llama_like else ModelType.gpt,
            position_embedding_type="rope" if llama_like else "learned_absolute",
            max_position_embeddings=self.model.max_sequence_length,
            rotary_percentage=float(model_cfg.get("rotary_percent", 1.0)),
            rotary_base=int(model_cfg.get("rotary_base", 10000)),
            activation=str(model_cfg.get("activation", "swiglu")),
            share_embeddings_and_output_weights=bool(model_cfg.get("share_embeddings_and_output_weights", False)),
        )
        weights, configs = self._convert()
        self._helper.build_and_save_engine(
            str(engine_dir), weights, configs[0], max_input_len=max_input_len,
            max_output_len=max_output_len, max_batch_size=max_batch_size, use_refit=True,
        )
        self._runner = ModelRunner.from_dir(
            str(engine_dir), rank=parallel_state.get_tensor_model_parallel_rank()
        )

    def _convert(self):
        """This rank's weights under TensorRT-LLM's names, on the GPU."""
        weights, configs = self._helper.get_trtllm_pretrained_config_and_model_weights(
            model_state_dict=self.model.state_dict(), dtype=self._dtype,
            on_device_distributed_conversion=True, vocab_size=self.vocab_size,
            gpus_per_node=torch.cuda.device_count(),
        )
        return weights[0], configs

    def refit(self, model) -> None:
        """Write ``model``'s current weights into the loaded engine (no rebuild)."""
        self.model = unwrap_model(model)
        weights, _ = self._convert()
        trt = self._trt
        engine = self._runner.session.runtime.engine
        refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
        kinds = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16}
        keep = []  # tensors must stay alive until refit_cuda_engine returns
        for name in refitter.get_all_weights():
            if name not in weights:
                continue
            w = weights[name].contiguous().cuda()
            keep.append(w)
            refitter.set_named_weights(
                name, trt.Weights(kinds[w.dtype], w.data_ptr(), w.numel()), trt.TensorLocation.DEVICE
            )
        if not refitter.refit_cuda_engine():
            raise GenerationError(f"TensorRT refit failed; missing weights: {refitter.get_missing_weights()}")

    def _stop_words(self, stop_strings, batch: int) -> torch.Tensor:
        """TensorRT-LLM's stop-word format ``[B, 2, L]`` int32: row 0 the concatenated token
        ids of every stop string, row 1 the end offset of each string (padded with -1)."""
        pieces = [self.tokenizer.text_to_ids(s) for s in stop_strings]
        flat = [t for piece in pieces for t in piece]
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
        table = torch.full((2, len(flat)), -1, dtype=torch.int32)
        table[0] = torch.tensor(flat, dtype=torch.int32)
        table[1, : len(ends)] = torch.tensor(ends, dtype=torch.int32)
        return table.unsqueeze(0).repeat(batch, 1, 1).cuda()

    def generate(self, prompts, sampling_params: SamplingParams, seeds=None) -> GenerationOutput:
        params = sampling_params
        ids = [self.tokenizer.text_to_ids(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, row in enumerate(ids):
            if len(row) > self.max_input_len:
                raise GenerationError(
                    f"prompt {i} has {len(row)} tokens; the TensorRT-LLM engine was built for at most "
                    f"{self.max_input_len}; shorten the prompt or rebuild with a larger max_input_len"
                )
        if params.max_new_tokens > self.max_output_len:
            raise GenerationError(
                f"sampling.max_new_tokens={params.max_new_tokens} exceeds the engine's max_output_len="
                f"{self.max_output_len}; lower it or rebuild the engine"
            )
        seeds = seeds if seeds is not None else [params.seed + i for i in range(len(ids))]
        stop_words = self._stop_words(params.stop_strings, len(ids)) if params.stop_strings else None
        with torch.no_grad():
            out = self._runner.generate(
                [torch.tensor(r, dtype=torch.int32) for r in ids],
                max_new_tokens=params.max_new_tokens,
                end_id=self.eos_id, pad_id=self.pad_id,
                temperature=params.temperature, top_k=1 if params.greedy else params.top_k,
                top_p=params.top_p, random_seed=list(seeds),
                min_length=params.min_new_tokens,
                stop_words_list=stop_words,
                output_log_probs=True, return_dict=True, output_sequence_lengths=True,
            )
        width = params.max_new_tokens
        tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        sampling = torch.zeros(len(ids), width)
        lengths = torch.zeros(len(ids), dtype=torch.long)
        for i, row in enumerate(ids):
            total = int(out["sequence_lengths"][i, 0])
            gen = out["output_ids"][i, 0, len(row):total].long().cpu()
            tokens[i, : gen.numel()] = gen
            sampling[i, : gen.numel()] = out["log_probs"][i, 0, : gen.numel()].float().cpu()
            lengths[i] = gen.numel()
        # Ended by EOS or a stop word, rather than by running out of new tokens.
        last = tokens.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        is_end = (lengths < width) | (last == self.eos_id)
        result = GenerationOutput(
            prompt_ids=ids, response_tokens=tokens, response_lengths=lengths,
            logprobs=torch.zeros(len(ids), width), sampling_logprobs=sampling, is_end=is_end,
        )
        result.logprobs = trainer_logprobs(self.model, result)
        result.texts = [self.tokenizer.ids_to_text(r) for r in result.response_ids]
        return result

    def free(self) -> None:
        self._runner = None
