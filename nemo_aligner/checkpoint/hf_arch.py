"""How each supported Hugging Face architecture maps onto Megatron-Core's ``GPTModel``.

Two things per architecture:

- the ``config.json`` <-> ``model.*`` translation (:func:`model_cfg_from_hf`,
  :func:`hf_config_from_model_cfg`);
- the weight map: for every Megatron parameter, which Hugging Face tensors it is made of and
  how (:func:`weight_map`). A :class:`Source` is one Hugging Face tensor, or a block of rows
  of one (GPT-2 keeps Q, K and V in a single ``c_attn``), optionally transposed (GPT-2's
  ``Conv1D`` stores ``[in, out]`` where a linear layer stores ``[out, in]``).

Megatron layouts the map relies on:

- ``linear_qkv`` holds, for each query group in turn, that group's query heads, then its
  key head, then its value head (rows of ``head_dim`` each);
- a gated MLP's ``linear_fc1`` holds ``[gate; up]`` per tensor-parallel shard (rank ``r``
  holds ``[gate_r; up_r]``), and the activation applies to the gate half;
- RoPE rotates the two halves of each head (``rotary_interleaved=False``), the same
  convention as Hugging Face's ``rotate_half``, so query/key rows need no permutation.
"""

from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")

# What a parameter is made of, and so how it is sharded and merged (see hf.py).
REPLICATED, COLUMN, ROW, QKV, GLU, VOCAB = "replicated", "column", "row", "qkv", "glu", "vocab"
ZERO = "zero"  # no Hugging Face counterpart: zero on import, must be zero to export

_DTYPES = {"float32": "32", "bfloat16": "bf16", "float16": "16"}
_PRECISION_TO_HF = {"32": "float32", "bf16": "bfloat16", "16": "float16"}


class UnsupportedArchitecture(ValueError):
    """A Hugging Face ``model_type`` (or feature of one) this converter does not handle."""


@dataclass(frozen=True)
class Source:
    """Rows ``[offset, offset + rows)`` of Hugging Face tensor ``name`` (all rows when
    ``rows`` is None), read transposed when ``transpose`` (Conv1D weights)."""

    name: str
    transpose: bool = False
    offset: int = 0
    rows: int | None = None


@dataclass(frozen=True)
class Param:
    """A Megatron parameter built from ``sources`` by ``kind``."""

    kind: str
    sources: tuple = field(default_factory=tuple)


def _rope_settings(hf: dict) -> tuple[float, dict | None]:
    """``(rope_theta, llama3 scaling or None)`` from old (``rope_theta``/``rope_scaling``) or
    new (``rope_parameters``) style configs."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return float(theta), None
        if kind != "llama3":
            raise UnsupportedArchitecture(
                f"rope_type {kind!r} is not supported (supported: default, llama3)"
            )
        scaling = {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    return float(theta), scaling or None


def _precision(hf: dict) -> str | None:
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    return _DTYPES.get(str(dtype)) if dtype else None


def model_cfg_from_hf(hf: dict) -> dict:
    """``model.*`` architecture keys for a Hugging Face ``config.json`` dict.

    Raises :class:`UnsupportedArchitecture` naming the ``model_type`` (or the feature) that
    cannot be represented.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"Hugging Face model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    cfg = _gpt2_cfg(hf) if model_type == "gpt2" else _llama_family_cfg(hf, model_type)
    if is_sequence_classifier(hf):
        # A reward model: the classifier's ``score`` is the reward head on the last real token.
        labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 1)
        cfg.update(
            reward_model_type="binary_ranking" if labels == 1 else "regression",
            num_attributes=labels, reward_reduction="last",
        )
    return cfg


def is_sequence_classifier(hf: dict) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def _llama_family_cfg(hf: dict, model_type: str) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(f"{model_type} with hidden_act={hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias", False):
        raise UnsupportedArchitecture(f"{model_type} with mlp_bias=true is not supported")
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    if model_type != "qwen2" and hf.get("attention_bias", False):
        # Llama's attention_bias also biases o_proj; Megatron ties that to the MLP biases.
        raise UnsupportedArchitecture(f"{model_type} with attention_bias=true is not supported")
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope_settings(hf)
    cfg = {
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": int(hf["hidden_size"]),
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "kv_channels": int(hf.get("head_dim") or hf["hidden_size"] // heads),
        "normalization": "rmsnorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu",
        "bias": False,
        "qkv_bias": qkv_bias,
        "position_embedding_type": "rope",
        "rotary_base": theta,
        "rotary_percent": 1.0,
        "rope_scaling": scaling,
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "vocab_size": int(hf["vocab_size"]),
        "make_vocab_size_divisible_by": 128,
    }
    window = hf.get("sliding_window")
    use_window = hf.get("use_sliding_window", model_type == "mistral")
    if window is not None and use_window and int(window) < cfg["max_position_embeddings"]:
        # Attention here is full causal: exact only for sequences that fit in the window.
        cfg["sliding_window"] = int(window)
    return cfg


def _gpt2_cfg(hf: dict) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise UnsupportedArchitecture(
            "gpt2 with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn is not supported"
        )
    if hf.get("scale_attn_weights", True) is False:
        raise UnsupportedArchitecture("gpt2 with scale_attn_weights=false is not supported")
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    act = hf.get("activation_function", "gelu_new")
    if act not in activations:
        raise UnsupportedArchitecture(f"gpt2 with activation_function={act!r}")
    hidden = int(hf["n_embd"])
    return {
        "num_layers": int(hf["n_layer"]),
        "hidden_size": hidden,
        "ffn_hidden_size": int(hf.get("n_inner") or 4 * hidden),
        "num_attention_heads": int(hf["n_head"]),
        "num_query_groups": int(hf["n_head"]),
        "kv_channels": hidden // int(hf["n_head"]),
        "normalization": "layernorm",
        "layernorm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "activation": activations[act],
        "bias": True,
        "qkv_bias": True,
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": True,
        "max_position_embeddings": int(hf.get("n_positions", 1024)),
        "vocab_size": int(hf["vocab_size"]),
        "make_vocab_size_divisible_by": 128,
    }


def infer_model_type(model_cfg: dict) -> str:
    """The Hugging Face ``model_type`` a ``model.*`` config can be written as."""
    hf = model_cfg.get("hf_config") or {}
    if hf.get("model_type") in SUPPORTED_MODEL_TYPES:
        return hf["model_type"]
    get = model_cfg.get
    if (get("normalization") == "layernorm" and get("position_embedding_type") == "learned_absolute"
            and get("bias") and get("share_embeddings_and_output_weights")
            and get("activation") in ("gelu", "gelu_tanh", "relu")
            and (get("num_query_groups") or get("num_attention_heads")) == get("num_attention_heads")):
        return "gpt2"
    if (get("normalization", "rmsnorm") == "rmsnorm" and get("activation", "swiglu") == "swiglu"
            and get("position_embedding_type", "rope") == "rope" and not get("bias")
            and float(get("rotary_percent", 1.0)) == 1.0):
        return "qwen2" if get("qkv_bias") else "llama"
    raise UnsupportedArchitecture(
        "this model has no Hugging Face equivalent among "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (normalization={get('normalization')}, "
        f"activation={get('activation')}, position_embedding_type={get('position_embedding_type')}, "
        f"bias={get('bias')})"
    )


def hf_config_from_model_cfg(model_cfg: dict, model_type: str, dtype: str, special_ids: dict) -> dict:
    """A ``config.json`` dict for ``model_cfg``: the imported model's own config (when it
    came from Hugging Face) with the architecture fields rewritten from ``model_cfg``."""
    cfg = dict(model_cfg.get("hf_config") or {})
    cfg.pop("rope_parameters", None)  # written below in the form every transformers reads
    heads = int(model_cfg["num_attention_heads"])
    hidden = int(model_cfg["hidden_size"])
    ids = {k: v for k, v in special_ids.items() if v is not None}
    max_positions = int(model_cfg.get("max_position_embeddings") or model_cfg["encoder_seq_length"])
    if model_type == "gpt2":
        cfg.update(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=hidden,
            n_layer=int(model_cfg["num_layers"]), n_head=heads,
            n_inner=int(model_cfg.get("ffn_hidden_size") or 4 * hidden),
            n_positions=max_positions,
            activation_function={"gelu_tanh": "gelu_new"}.get(model_cfg["activation"], model_cfg["activation"]),
            layer_norm_epsilon=float(model_cfg.get("layernorm_epsilon", 1e-5)),
            tie_word_embeddings=True, vocab_size=int(model_cfg["vocab_size"]),
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
        cfg.update(
            architectures=[arch], model_type=model_type, hidden_size=hidden,
            intermediate_size=int(model_cfg["ffn_hidden_size"]),
            num_hidden_layers=int(model_cfg["num_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(model_cfg.get("num_query_groups") or heads),
            head_dim=int(model_cfg.get("kv_channels") or hidden // heads),
            hidden_act="silu", rms_norm_eps=float(model_cfg.get("layernorm_epsilon", 1e-5)),
            max_position_embeddings=max_positions,
            rope_theta=float(model_cfg.get("rotary_base", 10000)),
            tie_word_embeddings=bool(model_cfg.get("share_embeddings_and_output_weights", False)),
            vocab_size=int(model_cfg["vocab_size"]), attention_dropout=0.0,
        )
        scaling = model_cfg.get("rope_scaling")
        cfg["rope_scaling"] = dict(scaling, rope_type="llama3") if scaling else None
        if model_type == "llama":
            cfg.update(attention_bias=False, mlp_bias=False)
        if model_cfg.get("sliding_window"):
            cfg["sliding_window"] = int(model_cfg["sliding_window"])
    if model_cfg.get("reward_model_type"):
        if str(model_cfg.get("reward_reduction", "last")) != "last":
            raise UnsupportedArchitecture(
                "a reward model with reward_reduction=mean has no Hugging Face equivalent "
                "(sequence classifiers score the last real token)"
            )
        from nemo_aligner.models.reward_model import reward_settings

        labels = reward_settings(model_cfg)["num_attributes"]
        cfg["architectures"] = [cfg["architectures"][0].replace("LMHeadModel", "ForSequenceClassification")
                                .replace("ForCausalLM", "ForSequenceClassification")]
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        cfg["num_labels"] = labels
    cfg.update(ids)
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    return cfg


def hf_dtype_name(precision) -> str:
    return _PRECISION_TO_HF.get(str(precision), "float32")


def precision_from_hf(hf: dict) -> str | None:
    return _precision(hf)


def weight_map(model_type: str, model_cfg: dict, hf_names=None) -> dict:
    """``{megatron name (global layer numbering): Param}`` for one architecture.

    ``hf_names``, the tensor names of a checkpoint being read, settles GPT-2's naming
    variant (with or without the ``transformer.`` prefix); ``None`` (writing) gives the
    names ``save_pretrained`` uses. Layer-norm weights are listed under both local-spec
    names (``input_layernorm``) and Transformer Engine names
    (``linear_qkv.layer_norm_weight``); a model has one of them.
    """
    layers = int(model_cfg["num_layers"])
    tied = bool(model_cfg.get("share_embeddings_and_output_weights", False))
    out = {}
    if model_type == "gpt2":
        p = "transformer." if hf_names is None or "transformer.wte.weight" in hf_names else ""
        out["embedding.word_embeddings.weight"] = Param(VOCAB, (Source(f"{p}wte.weight"),))
        out["embedding.position_embeddings.weight"] = Param(REPLICATED, (Source(f"{p}wpe.weight"),))
        out["output_layer.weight"] = Param(VOCAB, (Source(f"{p}wte.weight"),))
        out["decoder.final_layernorm.weight"] = Param(REPLICATED, (Source(f"{p}ln_f.weight"),))
        out["decoder.final_layernorm.bias"] = Param(REPLICATED, (Source(f"{p}ln_f.bias"),))
        hidden = int(model_cfg["hidden_size"])
        for i in range(layers):
            h, m = f"{p}h.{i}.", f"decoder.layers.{i}."
            _norms(out, m, "weight", Source(h + "ln_1.weight"), Source(h + "ln_2.weight"))
            _norms(out, m, "bias", Source(h + "ln_1.bias"), Source(h + "ln_2.bias"))
            out[m + "self_attention.linear_qkv.weight"] = Param(QKV, tuple(
                Source(h + "attn.c_attn.weight", True, j * hidden, hidden) for j in range(3)))
            out[m + "self_attention.linear_qkv.bias"] = Param(QKV, tuple(
                Source(h + "attn.c_attn.bias", False, j * hidden, hidden) for j in range(3)))
            out[m + "self_attention.linear_proj.weight"] = Param(ROW, (Source(h + "attn.c_proj.weight", True),))
            out[m + "self_attention.linear_proj.bias"] = Param(REPLICATED, (Source(h + "attn.c_proj.bias"),))
            out[m + "mlp.linear_fc1.weight"] = Param(COLUMN, (Source(h + "mlp.c_fc.weight", True),))
            out[m + "mlp.linear_fc1.bias"] = Param(COLUMN, (Source(h + "mlp.c_fc.bias"),))
            out[m + "mlp.linear_fc2.weight"] = Param(ROW, (Source(h + "mlp.c_proj.weight", True),))
            out[m + "mlp.linear_fc2.bias"] = Param(REPLICATED, (Source(h + "mlp.c_proj.bias"),))
        return _with_reward_head(out, model_cfg)

    out["embedding.word_embeddings.weight"] = Param(VOCAB, (Source("model.embed_tokens.weight"),))
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    out["output_layer.weight"] = Param(VOCAB, (Source(head),))
    out["decoder.final_layernorm.weight"] = Param(REPLICATED, (Source("model.norm.weight"),))
    for i in range(layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        _norms(out, m, "weight", Source(h + "input_layernorm.weight"), Source(h + "post_attention_layernorm.weight"))
        attn = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = Param(QKV, tuple(
            Source(f"{attn}{x}_proj.weight") for x in "qkv"))
        if model_cfg.get("qkv_bias"):
            out[m + "self_attention.linear_qkv.bias"] = Param(QKV, tuple(
                Source(f"{attn}{x}_proj.bias") for x in "qkv"))
        out[m + "self_attention.linear_proj.weight"] = Param(ROW, (Source(attn + "o_proj.weight"),))
        out[m + "mlp.linear_fc1.weight"] = Param(GLU, (Source(h + "mlp.gate_proj.weight"), Source(h + "mlp.up_proj.weight")))
        out[m + "mlp.linear_fc2.weight"] = Param(ROW, (Source(h + "mlp.down_proj.weight"),))
    return _with_reward_head(out, model_cfg)


def _with_reward_head(out: dict, model_cfg: dict) -> dict:
    """A reward model's head is a sequence classifier's ``score`` (bias-free there)."""
    if model_cfg.get("reward_model_type"):
        out["reward_head.weight"] = Param(ROW, (Source("score.weight"),))
        out["reward_head.bias"] = Param(ZERO)
    return out


def _norms(out: dict, prefix: str, suffix: str, attn_norm: Source, mlp_norm: Source) -> None:
    out[f"{prefix}input_layernorm.{suffix}"] = Param(REPLICATED, (attn_norm,))
    out[f"{prefix}self_attention.linear_qkv.layer_norm_{suffix}"] = Param(REPLICATED, (attn_norm,))
    out[f"{prefix}pre_mlp_layernorm.{suffix}"] = Param(REPLICATED, (mlp_norm,))
    out[f"{prefix}mlp.linear_fc1.layer_norm_{suffix}"] = Param(REPLICATED, (mlp_norm,))
