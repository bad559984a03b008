"""Build a Megatron-Core ``GPTModel`` from the ``model.*`` config.

Two families are covered by the same keys:

- Llama style: ``normalization: rmsnorm``, ``activation: swiglu``, ``position_embedding_type:
  rope`` (``rotary_base``, optional Llama-3 ``rope_scaling``), GQA through
  ``num_query_groups``, untied embeddings, no biases (``qkv_bias`` for Qwen2).
- GPT-2 style: ``normalization: layernorm``, ``activation: gelu``, ``position_embedding_type:
  learned_absolute``, ``bias: true``, ``share_embeddings_and_output_weights: true``.

The layer spec is Transformer Engine's when it is importable and CUDA is present, and
otherwise Megatron's local spec with :class:`SDPACoreAttention` (CPU-capable, packed
sequences). Initialization is independent of the parallel layout (see
:func:`init_weights_layout_invariant`), so a model built at TP2xPP2 holds the same
weights as the one built at TP1xPP1 from the same seed.
"""

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_aligner.models.attention import SDPACoreAttention
from nemo_aligner.models.linear import use_plain_linears
from nemo_aligner.models.mlp import use_swiglu_mlps
from nemo_aligner.models.norm import use_fast_norms
from nemo_aligner.models.rope import install as use_cached_rope
from nemo_aligner.utils.config import cfg_get, cfg_int
from nemo_aligner.utils.cpu_support import cuda_on_cpu

ACTIVATIONS = {
    # name: (activation function, gated linear unit)
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),
    "relu": (F.relu, False),
    "squared_relu": (lambda x: F.relu(x).pow(2), False),
    "silu": (F.silu, False),
}
NORMALIZATIONS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
PRECISIONS = {
    "32": torch.float32, "fp32": torch.float32, "32-true": torch.float32,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "16": torch.float16, "fp16": torch.float16, "16-mixed": torch.float16,
}


class ModelConfigError(ValueError):
    """A model config value that cannot be built."""


def _choice(cfg, key, table, default):
    value = str(cfg_get(cfg, key, default)).lower()
    if value not in table:
        raise ModelConfigError(
            f"model.{key}={value!r} is not supported; choose one of {sorted(table)}"
        )
    return table[value]


def params_dtype(cfg) -> torch.dtype:
    return _choice(cfg, "precision", PRECISIONS, "32")


def padded_vocab_size(vocab_size: int, cfg) -> int:
    """Round the vocabulary up to ``make_vocab_size_divisible_by`` (layout-independent)."""
    multiple = int(cfg_get(cfg, "make_vocab_size_divisible_by", 128))
    tp = int(cfg_get(cfg, "tensor_model_parallel_size", 1))
    padded = int(math.ceil(vocab_size / multiple) * multiple)
    if padded % tp != 0:
        raise ModelConfigError(
            f"padded vocab size {padded} is not divisible by tensor_model_parallel_size={tp}; "
            "set model.make_vocab_size_divisible_by to a multiple of the TP size"
        )
    return padded


def transformer_config(cfg, initialize: bool = True) -> TransformerConfig:
    """Translate ``model.*`` keys into a Megatron ``TransformerConfig``.

    ``initialize=False`` leaves the weights uninitialized, for callers that load every
    weight right after (Hugging Face import).
    """
    activation, gated = _choice(cfg, "activation", ACTIVATIONS, "swiglu")
    dtype = params_dtype(cfg)
    tp = cfg_int(cfg, "tensor_model_parallel_size", 1, minimum=1, name="model.tensor_model_parallel_size")
    pp = cfg_int(cfg, "pipeline_model_parallel_size", 1, minimum=1, name="model.pipeline_model_parallel_size")
    num_layers = cfg_int(cfg, "num_layers", minimum=1, name="model.num_layers")
    heads = cfg_int(cfg, "num_attention_heads", minimum=1, name="model.num_attention_heads")
    groups = cfg_int(cfg, "num_query_groups", heads, minimum=1, name="model.num_query_groups")
    hidden = cfg_int(cfg, "hidden_size", minimum=1, name="model.hidden_size")
    ffn = cfg_int(cfg, "ffn_hidden_size", 4 * hidden, minimum=1, name="model.ffn_hidden_size")
    kv_channels = cfg_get(cfg, "kv_channels", None)
    if kv_channels is not None:
        kv_channels = cfg_int(cfg, "kv_channels", minimum=1, name="model.kv_channels")
    if num_layers % pp != 0:
        raise ModelConfigError(
            f"model.num_layers={num_layers} is not divisible by pipeline_model_parallel_size={pp}"
        )
    if heads % groups != 0:
        raise ModelConfigError(
            f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}; each group "
            "of query heads shares one key/value head"
        )
    if kv_channels is None and hidden % heads != 0:
        raise ModelConfigError(
            f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}; change one, or "
            "set model.kv_channels (the size of each head)"
        )
    if heads % tp != 0 or groups % tp != 0:
        raise ModelConfigError(
            f"num_attention_heads={heads} and num_query_groups={groups} must be divisible by "
            f"tensor_model_parallel_size={tp}"
        )
    if ffn % tp != 0:
        raise ModelConfigError(f"model.ffn_hidden_size={ffn} is not divisible by tensor_model_parallel_size={tp}")
    on_gpu = torch.cuda.is_available()
    std = float(cfg_get(cfg, "init_method_std", 0.02))
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=kv_channels or hidden // heads,
        normalization=_choice(cfg, "normalization", NORMALIZATIONS, "rmsnorm"),
        layernorm_epsilon=float(cfg_get(cfg, "layernorm_epsilon", 1e-5)),
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=bool(cfg_get(cfg, "bias", False)),
        add_qkv_bias=bool(cfg_get(cfg, "qkv_bias", False)),
        hidden_dropout=float(cfg_get(cfg, "hidden_dropout", 0.0)),
        attention_dropout=float(cfg_get(cfg, "attention_dropout", 0.0)),
        init_method_std=std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=bool(cfg_get(cfg, "sequence_parallel", False)) and tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=initialize,
        # Fused kernels exist only on GPU.
        bias_activation_fusion=on_gpu and gated is False and activation is F.gelu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=False,
        recompute_granularity=cfg_get(cfg, "activations_checkpoint_granularity", None),
        recompute_method=cfg_get(cfg, "activations_checkpoint_method", None),
        recompute_num_layers=cfg_get(cfg, "activations_checkpoint_num_layers", None),
    )


def uses_transformer_engine() -> bool:
    """Whether models are built with Transformer Engine's layer spec (CUDA and TE present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(config: TransformerConfig):
    if uses_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


@dataclass
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def build_gpt_model(cfg, vocab_size: int, pre_process=None, post_process=None, seed=None,
                    initialize: bool = True, model_class=GPTModel, **model_kwargs):
    """Build this rank's part of the GPT described by ``cfg`` (``model.*``).

    ``vocab_size`` is the real vocabulary (the tokenizer's, or an imported model's); it is
    padded (see :func:`padded_vocab_size`) and the padding ids are masked out of the logits
    (see :func:`mask_padded_vocab`). ``pre_process``/``post_process`` default to this rank's
    pipeline position. ``initialize=False`` skips weight initialization (the caller loads
    every weight). ``model_class`` (a ``GPTModel`` subclass, e.g. the reward model) is built
    with the same arguments plus ``model_kwargs``.
    """
    window = cfg_get(cfg, "sliding_window", None)
    if window is not None and int(cfg_get(cfg, "encoder_seq_length")) > int(window):
        raise ModelConfigError(
            f"model.encoder_seq_length={cfg_get(cfg, 'encoder_seq_length')} exceeds the model's "
            f"sliding_window={window}; attention here is full causal, which equals sliding-window "
            f"attention only up to {window} tokens: set model.encoder_seq_length <= {window}"
        )
    config = transformer_config(cfg, initialize=initialize)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    position = str(cfg_get(cfg, "position_embedding_type", "rope"))
    if position not in ("rope", "learned_absolute"):
        raise ModelConfigError(
            f"model.position_embedding_type={position!r}; choose rope or learned_absolute"
        )
    max_len = int(
        cfg_get(cfg, "max_position_embeddings", None) or cfg_get(cfg, "encoder_seq_length")
    )
    # With tied embeddings under PP the constructor syncs the embedding copy over CUDA.
    with cuda_on_cpu():
        model = model_class(
            config=config,
            transformer_layer_spec=layer_spec(config),
            vocab_size=padded_vocab_size(vocab_size, cfg),
            max_sequence_length=max_len,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(
                cfg_get(cfg, "share_embeddings_and_output_weights", False)
            ),
            position_embedding_type=position,
            rotary_percent=float(cfg_get(cfg, "rotary_percent", 1.0)),
            rotary_base=int(cfg_get(cfg, "rotary_base", 10000)),
            seq_len_interpolation_factor=cfg_get(cfg, "seq_len_interpolation_factor", None),
            **model_kwargs,
        )
    if not uses_transformer_engine():  # the local spec's RoPE, norms, linears and SwiGLU, with fewer ops
        use_cached_rope()
        use_fast_norms(model)
        use_plain_linears(model)
        use_swiglu_mlps(model)
    scaling = cfg_get(cfg, "rope_scaling", None)
    if scaling and position == "rope":
        params = RopeScaling(**{k: v for k, v in dict(scaling).items() if k in RopeScaling.__dataclass_fields__})
        rope = model.rotary_pos_emb
        rope.inv_freq = rope._apply_scaling(
            rope.inv_freq,
            factor=params.factor,
            low_freq_factor=params.low_freq_factor,
            high_freq_factor=params.high_freq_factor,
            original_max_position_embeddings=params.original_max_position_embeddings,
        )
    if post_process:
        mask_padded_vocab(model, vocab_size)
    if config.params_dtype != torch.float32:
        # Megatron's norms are created in float32 whatever params_dtype says; like
        # Megatron's Float16Module, keep every parameter in the training dtype.
        model.to(dtype=config.params_dtype)
    if seed is not None and initialize:
        # (Skipped without initialization: the caller writes every weight, and reading the
        # untouched memory first would map it to the zero page, making each first write a
        # copy-on-write fault: ~0.25 s for 20 M parameters on a 2-core VM.)
        init_weights_layout_invariant(model, seed, config)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mask_padded_vocab(model, vocab_size: int) -> None:
    """Give the padding rows of the vocabulary (ids >= ``vocab_size``) a logit of ``-inf``-like
    magnitude, so softmax, log-probs, entropy and sampling see exactly the real vocabulary.

    The padded vocabulary exists only to tile the output layer evenly over tensor-parallel
    ranks; left alone, its rows would produce real logits (0 for zero-filled rows of an
    imported model) that take probability mass. The value is finite, so entropies stay
    finite (``p * z = 0``), and it is written in place over just the padding columns of this
    rank's logits shard (their gradient is zero).
    """
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None:
        return
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def hook(module, args, output):
        logits = output[0]
        width = logits.shape[-1]
        gathered = tp == 1 or width != module.output_size_per_partition
        start = 0 if gathered else tp_rank * width
        lo = max(vocab_size - start, 0)
        if lo < width:
            logits.narrow(-1, lo, width - lo).fill_(torch.finfo(logits.dtype).min / 4)
        return output

    if output_layer.output_size_per_partition * tp > vocab_size:
        output_layer.register_forward_hook(hook)


def _stable_seed(seed: int, key: str, index: tuple) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(key: str, config: TransformerConfig) -> float:
    # Output projections of each residual branch get the scaled init (GPT-2 / Megatron).
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def _iter_sharded_tensors(sharded_state_dict):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded_state_dict.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            items = built.values() if isinstance(built, dict) else (
                built if isinstance(built, (list, tuple)) else [built]
            )
            for item in items:
                if isinstance(item, ShardedTensor):
                    yield item
        elif isinstance(value, ShardedTensor):
            yield value


@torch.no_grad()
def init_weights_layout_invariant(model, seed: int, config: TransformerConfig) -> None:
    """Re-draw every random weight so its value depends only on (seed, name, layer).

    Megatron's own CPU initialization consumes one RNG stream per rank, so the same seed
    gives different weights under different pipeline layouts. Here each global tensor
    (one layer's slice of a stacked parameter) is drawn from a generator seeded by its
    checkpoint key and global layer index, then this rank's shard is cut out of it, using
    the same sharding description as ``dist_checkpointing``. Constant-initialized tensors
    (norm weights, biases) are left alone.
    """
    for sh in _iter_sharded_tensors(model.sharded_state_dict()):
        local = sh.data
        if local.numel() == 0 or not local.is_floating_point():
            continue
        flat = local.reshape(-1)
        if bool((flat == flat[0]).all()):
            continue
        prepend = sh.prepend_axis_num
        global_shape = tuple(sh.global_shape[prepend:])
        offsets = tuple(sh.global_offset[prepend:])
        index = tuple(sh.global_offset[:prepend])
        gen = torch.Generator().manual_seed(_stable_seed(seed, sh.key, index))
        full = torch.empty(global_shape, dtype=torch.float32)
        full.normal_(0.0, _init_std(sh.key, config), generator=gen)
        slices = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
        local.copy_(full[slices].reshape(local.shape).to(local.dtype))

