"""A lean KV-cached forward over a Megatron-Core ``GPTModel``'s own parameters.

Why it exists: on CPU a decoding step is a handful of small matrix products, and the
per-module Python of ``GPTModel.forward`` (autograd functions around every linear layer,
tensor-parallel region wrappers, ``[s, b, h]`` transposes) plus Megatron's static KV cache,
which stores keys before rotary embedding and re-rotates the whole cache at every step,
cost several times the arithmetic (measured on a 4-layer, hidden-256 model, batch 16:
about 16 ms per step through ``GPTModel.forward`` against about 5 ms here; see
``benchmarks/generation_throughput.py``).

What it computes is exactly the model's forward for the local layer spec (the layer
sequence of ``TransformerLayer`` with ``SelfAttention`` + :class:`SDPACoreAttention` and
``MLP``): the same parameters, the model's own norm modules, ``matmul`` then bias as in
Megatron's linear layers, bias-add before the residual add, the model's activation and
gating, Megatron's rotary table, tensor-parallel all-reduces after the row-parallel
layers, and the output layer's product on the last position only (real vocabulary
rows; all-gathered under TP; through oneDNN on a packed copy of a large CPU output weight,
:class:`PackedOutputProduct`). Keys are cached *after* rotary
embedding, keys and values of a query group side by side (``[B, groups, 2, slots, dim]``),
so a step touches each cached key once and writes a token's keys and values in one copy.
The prefill runs the prompts' real tokens only, packed into one row (no products over left
padding: about a third of a batch of 16-64-token prompts), and scatters their keys and
values into the cache.

A decoding step is about 20 small kernels per layer whose launch costs as much as their
arithmetic on CPU, and so does making a view or a new tensor; so the step launches few and
makes few (:class:`_StepPlan`): its products write into buffers made once per batch, the
residual add is done by the row-parallel products themselves where there is no bias or TP
reduction, the views it reads through are made once, and a token's queries, key
and value are copied into a row-major buffer and rotated from it into a second one (two
copies and three kernels); the query heads of a group attend as the *positions* of one
query (``[B, groups, heads per group, dim]``: the same scores, no head expansion and no
query or output copies). On CPU with float32 weights, the step's products and attention run
on compiled kernels (:mod:`~nemo_aligner.generation.cpu_kernels`: each weight streamed once
for the batch's few rows, one pass over a row's keys and values), and on torch's kernels
(MKL, SDPA) where those cannot be built.

:func:`unsupported_reason` lists what it does not model; the engine then falls back to
:class:`~nemo_aligner.generation.context_decoder.MegatronContextDecoder`. Parity with the
model's own forward is tested for the Llama- and GPT-2-style configurations.
"""

import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from nemo_aligner.generation import cpu_kernels
from nemo_aligner.models.attention import SDPACoreAttention
from nemo_aligner.models.linear import ColumnLinear, RowLinear
from nemo_aligner.models.lora import adapters
from nemo_aligner.models.mlp import SwiGLUMLP


# Our subclasses (models/linear.py, models/mlp.py) hold the same weights as Megatron's classes.
_AS_MEGATRON = {ColumnLinear: ColumnParallelLinear, RowLinear: RowParallelLinear, SwiGLUMLP: MLP}


def unsupported_reason(model) -> str | None:
    """Why the lean decoder cannot run ``model`` (``None`` when it can)."""
    cfg = model.config
    flags = {
        "multi_latent_attention": cfg.multi_latent_attention,
        "num_moe_experts": cfg.num_moe_experts,
        "qk_layernorm": cfg.qk_layernorm,
        "attention_output_gate": getattr(cfg, "attention_output_gate", False),
        "fp32_residual_connection": cfg.fp32_residual_connection,
        "apply_residual_connection_post_layernorm": cfg.apply_residual_connection_post_layernorm,
        "rotary_interleaved": cfg.rotary_interleaved,
        "bias_activation_fusion": cfg.bias_activation_fusion,
        "use_te_activation_func": getattr(cfg, "use_te_activation_func", False),
        "activation_func_clamp_value": getattr(cfg, "activation_func_clamp_value", None),
        "glu_linear_offset": getattr(cfg, "glu_linear_offset", 0.0),
    }
    for name, value in flags.items():
        if value:
            return f"config.{name}={value}"
    if cfg.context_parallel_size != 1:
        return "context parallelism"
    if getattr(model, "mtp_process", False):
        return "multi-token prediction"
    if model.position_embedding_type not in ("rope", "learned_absolute"):
        return f"position_embedding_type={model.position_embedding_type}"
    if model.output_layer.bias is not None:
        return "an output layer bias"
    if any(a.enabled for a in adapters(model)):
        return "LoRA adapters (generate from merged weights: MegatronEngine.with_own_weights)"
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        checks = (
            (layer, TransformerLayer), (attn, SelfAttention), (mlp, MLP),
            (attn.core_attention, SDPACoreAttention),
            (attn.linear_qkv, ColumnParallelLinear), (attn.linear_proj, RowParallelLinear),
            (mlp.linear_fc1, ColumnParallelLinear), (mlp.linear_fc2, RowParallelLinear),
            (layer.cross_attention, IdentityOp),
        )
        for module, expected in checks:
            if _AS_MEGATRON.get(type(module), type(module)) is not expected:
                return f"layer module {type(module).__name__} (the lean decoder knows {expected.__name__})"
        if attn.config.num_query_groups < attn.world_size:
            return "fewer query groups than tensor-parallel ranks"
    return None


class _Rotation:
    """Megatron's non-interleaved RoPE on the first ``rot`` features of the queries and key
    of ``src`` ``[..., groups, per + 2, dim]`` (Megatron's fused layout: per group, its
    ``per`` query heads, one key, one value), written into the same places of ``dst``; the
    views are made once, so a decoding step applies it in three kernels.

    ``t * cos + rotate_half(t) * sin`` is computed as ``t * cos + flip_halves(t) *
    signed_sin``, where ``signed_sin`` is ``sin`` with its first half negated: one product
    and two accumulating products, the same roundings as Megatron's formula."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, per: int, rot: int):
        half = rot // 2
        src, dst = src[..., : per + 1, :], dst[..., : per + 1, :]
        self.src, self.dst = src[..., :rot], dst[..., :rot]
        self.src_lo, self.src_hi = src[..., :half], src[..., half:rot]
        self.dst_lo, self.dst_hi = dst[..., :half], dst[..., half:rot]

    def __call__(self, rope) -> None:
        """``rope``: ``(cos, sin_lo, sin_hi)`` broadcasting over ``[..., groups, per + 1, rot]``
        (``sin_lo`` / ``sin_hi``: the two halves of ``signed_sin``)."""
        cos, sin_lo, sin_hi = rope
        torch.mul(self.src, cos, out=self.dst)
        self.dst_lo.addcmul_(self.src_hi, sin_lo)
        self.dst_hi.addcmul_(self.src_lo, sin_hi)


def _rotated_qkv(qkv: torch.Tensor, per: int, rope) -> torch.Tensor:
    """A contiguous copy of ``qkv`` ``[..., groups, per + 2, dim]`` with the queries and the
    key rotated (:class:`_Rotation`; ``rope`` ``None``: no rotary embedding)."""
    out = qkv.clone(memory_format=torch.contiguous_format)
    if rope is not None:
        _Rotation(qkv, out, per, rope[0].shape[-1])(rope)
    return out


# Up to this many rows a product is computed as ``W @ x^T``: for a few rows against a
# ``[out, in]`` weight, MKL's kernel for that orientation runs about twice as fast as
# ``x @ W^T`` on this machine class (measured on AVX2 CPUs: 17 decoding-step products of a
# hidden-256 model with 16 rows, 1.8 ms against 3.7 ms), and the result is a transposed view
# whose transpose feeds the next product contiguously. Past a few hundred rows (prefill)
# the usual orientation is as fast or faster. Decoding steps always take this orientation
# (their activations stay transposed, see _StepPlan; batches of over 512 rows are rare in
# generation, and on GPUs both orientations run alike).
_SMALL_ROWS = 512


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` for ``x`` ``[..., in]`` and ``weight`` ``[out, in]``."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= _SMALL_ROWS:
        y = torch.mm(weight, flat.t()).t()
    else:
        y = torch.mm(flat, weight.t())
    return y.view(*x.shape[:-1], -1)


class PackedOutputProduct:
    """``x @ weight^T`` through oneDNN with ``weight`` reordered once into oneDNN's blocked
    layout, for the output layer's large ``[vocab, h]`` weight on CPU; one object serves the
    decoders of one ``generate`` call (the weights do not change during a call, and may
    change between calls without notice, e.g. through an optimizer's views of them).

    Why: a decoding step's output product has a few rows against a weight that does not
    fit in cache; MKL streams it at ~6.5 GB/s here, oneDNN's packed kernel at ~9.6 GB/s
    (16 x 256 against 32000 x 256: 5.0-5.5 -> 3.4-3.8 ms; 151936 x 256: 29 -> 17 ms), and
    its result is row-major, as token choice wants it. Below 8192 rows, and for the
    layers' smaller weights, MKL's ``W @ x^T`` is as fast or faster. The reorder copies the
    weight once (~20 ms for 32000 x 256, ~1.5 GB/s), so it is used only where a call runs
    enough steps to repay it, and it holds a second copy of the weight for the call.
    """

    MIN_ROWS = 8192  # measured: 8192 x 256 0.75 -> 0.56 ms hot, 1.8 -> 1.4 ms cold; 2048 x 256 no gain

    def __init__(self):
        self._key = self._packed = None

    @classmethod
    def applies(cls, weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] >= cls.MIN_ROWS and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # private ops: checked, not assumed
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride())
        if key != self._key:
            self._packed = None  # the old copy goes before the new one is made
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), x.shape[0])
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [None], "")


class _Linear:
    """``y = x @ W^T (+ b)`` for a Megatron column/row-parallel layer; a row-parallel layer
    all-reduces over tensor parallelism before its bias. (Whether Megatron adds the bias in
    the layer or leaves it to the caller, ``skip_bias_add``, the caller adds it next, so
    the result is the same.)"""

    def __init__(self, layer):
        self.weight, self.bias = layer.weight, layer.bias  # the parameters: refits show through
        self.group = layer.tp_group if isinstance(layer, RowParallelLinear) else None
        if self.group is not None and self.group.size() == 1:
            self.group = None
        self.kernel = cpu_kernels.applies(self.weight)  # decoding steps' products (cpu_kernels)

    def __call__(self, x):
        y = _product(x, self.weight)
        if self.group is not None:
            y = y.contiguous()  # collectives take dense tensors
            dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias
        return y


class _StepProduct:
    """A step plan's product for one layer: ``out = linear(x)``, or ``out += linear(x)`` with
    ``accumulate`` (a row-parallel layer adding into the residual stream), on transposed
    activations ``x_t`` ``[in, B]`` -> ``[out, B]`` (see :class:`_StepPlan`).

    Through the compiled kernel where it applies (:mod:`cpu_kernels`: float32 CPU weights,
    batches of up to ``MAX_ROWS`` rows), else ``torch.mm``; the residual add is done by the
    product itself where no bias and no tensor-parallel reduction come between them (the
    kernel's accumulating form, or ``addmm_``), else product, all-reduce, bias, add."""

    def __init__(self, linear: _Linear, out: torch.Tensor, accumulate: bool = False):
        self.linear = linear
        self.fused = accumulate and linear.group is None and linear.bias is None
        self.residual = out if accumulate and not self.fused else None
        self.target = out if self.residual is None else torch.empty_like(out)
        self.kernel = None
        if linear.kernel and out.shape[1] <= cpu_kernels.MAX_ROWS:
            self.kernel = cpu_kernels.Product(linear.weight, self.target, accumulate=self.fused)

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        linear, y_t = self.linear, self.target
        if self.kernel is not None:
            self.kernel(x_t)
        elif self.fused:
            y_t.addmm_(linear.weight, x_t)
        else:
            torch.mm(linear.weight, x_t, out=y_t)
        if self.fused:
            return y_t
        if linear.group is not None:
            dist.all_reduce(y_t, group=linear.group)
        if linear.bias is not None:
            y_t.add_(linear.bias.unsqueeze(1))
        if self.residual is not None:
            self.residual.add_(y_t)
        return y_t


def _rms_norm(module):
    """``torch.nn.RMSNorm``'s result (bit for bit, float32 statistics, weight applied before
    the cast back) from a few plain ops: torch's fused CPU entry point costs several times
    the arithmetic on decoding's ``[B, 1, h]`` inputs."""
    weight, dims = module.weight, tuple(range(-len(module.normalized_shape), 0))
    # The mean as torch's CPU mean computes it (a sum, then a division by the count), with
    # the count and eps as 0-dim tensors: a Python number is wrapped into a tensor at
    # every call (~12 of a norm's ~35 us on decoding inputs).
    count = torch.tensor(float(math.prod(module.normalized_shape)), dtype=torch.float32)
    eps = torch.tensor(module.eps if module.eps is not None else torch.finfo(torch.float32).eps, dtype=torch.float32)

    def norm(x):
        up = x if x.dtype == torch.float32 else x.float()
        # eps + sum / count in one kernel (addcdiv: the same two roundings as div then add).
        y = up * torch.addcdiv(eps, up.pow(2).sum(dims, keepdim=True), count).rsqrt_()
        if weight is not None:
            y.mul_(weight)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    return norm


def _norm(module):
    """The norm as a function: torch's RMSNorm / LayerNorm computed as their ``forward``
    does, any other norm module as is."""
    if isinstance(module, torch.nn.RMSNorm):  # torch's or models.norm.RMSNorm (same forward)
        return _rms_norm(module)
    if type(module) is torch.nn.LayerNorm:
        F = torch.nn.functional
        return lambda x: F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module


class _Layer:
    """The parts of one ``TransformerLayer`` the forward needs, looked up once."""

    def __init__(self, layer):
        attn, mlp = layer.self_attention, layer.mlp
        self.input_norm, self.mlp_norm = _norm(layer.input_layernorm), _norm(layer.pre_mlp_layernorm)
        self.qkv, self.proj = _Linear(attn.linear_qkv), _Linear(attn.linear_proj)
        self.fc1, self.fc2 = _Linear(mlp.linear_fc1), _Linear(mlp.linear_fc2)
        self.heads = attn.num_attention_heads_per_partition
        self.groups = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        self.activation = layer.config.activation_func
        self.gated = layer.config.gated_linear_unit


class _LayerBuffers:
    """A layer's decoding-step buffers and the views the step reads and writes through
    (see :class:`_StepPlan`)."""

    def __init__(self, layer: _Layer, kv: torch.Tensor, per: int, rot: int, like: torch.Tensor, bias, residual_t):
        b, g, d = kv.shape[0], layer.groups, layer.head_dim
        self.qkv_t = like.new_empty(layer.qkv.weight.shape[0], b)  # the product's result
        self.qkv = self.qkv_t.t().view(b, g, per + 2, d)  # Megatron's fused layout, per row
        # The rotation reads a row-major copy: on the product's transposed result its
        # kernels run strided (31 -> 23 us a layer for the copy and rotation at hidden 256).
        self.staged = like.new_empty(b, g, per + 2, d) if rot else None
        self.rotated = like.new_empty(b, g, per + 2, d)
        self.rotation = _Rotation(self.staged, self.rotated, per, rot) if rot else None
        self.queries, self.new_kv = self.rotated[:, :, :per], self.rotated[:, :, per:]
        self.kv, self.keys, self.values = kv, kv[:, :, 0], kv[:, :, 1]
        # The step's attention through the compiled kernel where it runs (cpu_kernels).
        self.attend = None
        if like.device.type == "cpu" and like.dtype == torch.float32 and cpu_kernels.library() is not None:
            scale = layer.scale if layer.scale is not None else 1.0 / math.sqrt(d)
            self.attend = cpu_kernels.DecodeAttention(
                self.queries, self.keys, self.values, bias, scale, like.new_empty(b, g, per, d))
        self.h1_t = like.new_empty(layer.fc1.weight.shape[0], b)
        self.h1 = self.h1_t.t()
        self.qkv_product, self.fc1_product = _StepProduct(layer.qkv, self.qkv_t), _StepProduct(layer.fc1, self.h1_t)
        self.proj_product = _StepProduct(layer.proj, residual_t, accumulate=True)
        self.fc2_product = _StepProduct(layer.fc2, residual_t, accumulate=True)
        if layer.gated:
            self.gate, self.linear = torch.chunk(self.h1, 2, dim=-1)


class _StepPlan:
    """Everything a decoding step of a batch of ``B`` rows writes into, made once (and again
    when the batch shrinks), with the views it reads through.

    Why: a step is ~20 small kernels per layer, and on CPU making a view or a new tensor
    costs about as much as a small kernel (2-5 us each: ~200 views a step in a hidden-256,
    4-layer model, over a tenth of the step). Products write into their buffers
    (:class:`_StepProduct`), the row-parallel products accumulate into the residual stream
    in place, the attention writes into its own buffer where it runs on the compiled kernel
    (:class:`~nemo_aligner.generation.cpu_kernels.DecodeAttention`), and the slices of the
    rotation, the attention's operands, the mask and the rotary table are views made here;
    a step then makes only the views that move with the slot (the rotary table's row, the
    cache's length, the slot's keys and values) and the outputs of the norms, the attention
    (on torch's kernels) and the activation.

    The residual stream is kept transposed, ``[h, B]``: ``W @ x^T`` products (see
    :data:`_SMALL_ROWS`) give their results in that layout and take the next product's
    input in it; the norms read it through the transposed view ``[B, h]``.
    """

    def __init__(self, decoder: "LeanDecoder"):
        like = decoder.word_weight
        b, h = decoder.positions.shape[0], like.shape[1]
        self.residual_t = like.new_empty(h, b)
        self.residual = self.residual_t.t()
        self.key_bias = decoder.key_bias[:, None, None, :]
        self.rope = None if decoder.rope_table is None else tuple(t[:, :, None, None, :] for t in decoder.rope_table)
        rot = 0 if decoder.rope_table is None else decoder.rope_table[0].shape[-1]
        bias = decoder.key_bias if decoder.padded else None
        self.layers = [
            _LayerBuffers(layer, kv, decoder.per, rot, like, bias, self.residual_t)
            for layer, kv in zip(decoder.layers, decoder.kv)
        ]


class LeanDecoder:
    """Prefill + one-token steps with a rotated-key cache; same interface as
    :class:`~nemo_aligner.generation.context_decoder.MegatronContextDecoder`.

    ``positions`` / ``key_valid`` ``[B, slots]``: each row's position at every cache slot and
    whether the slot holds a real token (False for left padding). Logits cover the real
    vocabulary, ``[B, vocab_size]``. ``output_product``: computes the output layer's product
    where :meth:`PackedOutputProduct.applies` to its weight (the engine passes one per call).
    """

    def __init__(
        self, model, positions: torch.Tensor, key_valid: torch.Tensor, vocab_size: int,
        output_product: PackedOutputProduct | None = None,
    ):
        self.positions, self.key_valid = positions, key_valid
        self.padded = bool((~key_valid).any())
        # Steps mask padding slots with an additive float mask made once: SDPA turns a
        # boolean mask into this at every call, per layer (about a quarter of a step's
        # attention time at batch 16).
        dtype = model.embedding.word_embeddings.weight.dtype
        self.key_bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
        self.key_bias.masked_fill_(~key_valid, float("-inf"))
        self.layers = [_Layer(layer) for layer in model.decoder.layers]
        self.final_norm = _norm(model.decoder.final_layernorm)
        self.embedding = model.embedding
        words = model.embedding.word_embeddings
        self.word_weight = words.weight
        self.vocab_range = (words.vocab_start_index, words.vocab_end_index)
        self.embed_group = words.tp_group if words.tp_group.size() > 1 else None
        # Logits of the real vocabulary only: the padding rows of the output layer are never
        # sampled, so they are not computed (under TP, this rank's shard is computed whole
        # and the gathered logits are cut).
        weight = (
            model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
            else model.output_layer.weight
        )
        self.vocab_size = vocab_size
        self.output_group = model.output_layer.tp_group if model.output_layer.tp_group.size() > 1 else None
        self.output_weight = weight if self.output_group is not None else weight[:vocab_size]
        usable = output_product is not None and output_product.applies(self.output_weight)
        self.output_product = output_product if usable else None
        self.output_kernel = cpu_kernels.applies(self.output_weight)
        b, slots = positions.shape
        dtype, device = self.word_weight.dtype, self.word_weight.device
        first = self.layers[0]
        self.per = first.heads // first.groups  # query heads per key/value head
        shape = (b, first.groups, 2, slots, first.head_dim)
        self.kv = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        # (cos, sin_lo, sin_hi) [B, slots, rot or rot / 2]: see _Rotation; None without RoPE.
        self.rope_table = None
        if model.position_embedding_type == "rope":
            table = model.rotary_pos_emb(slots)[:, 0, 0, :][positions]  # [B, slots, rot]
            # As Megatron does: cos/sin in float32, then cast to the activations' dtype.
            cos, sin = table.cos().to(dtype), table.sin().to(dtype)
            half = sin.shape[-1] // 2
            self.rope_table = (cos, -sin[..., :half], sin[..., half:])
        self._plan = None  # the step's buffers (_StepPlan), made at the first step
        self.length = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kv = self._plan = None

    def _embed(self, tokens, positions):
        if self.embed_group is None:
            x = torch.nn.functional.embedding(tokens, self.word_weight)
        else:
            start, end = self.vocab_range
            outside = (tokens < start) | (tokens >= end)
            local = (tokens - start).masked_fill_(outside, 0)
            x = torch.nn.functional.embedding(local, self.word_weight)
            x[outside] = 0.0
            dist.all_reduce(x, group=self.embed_group)
        if self.embedding.add_position_embedding:
            x = x + self.embedding.position_embeddings(positions)
        return x

    def _packed_attention(self, layer, index, y, rope, mask, packed):
        """Prefill attention for the prompts' real tokens only (``y`` ``[1, T, h]``, row
        after row): products over ``T`` rows, keys and values scattered into their cache
        slots, attention over the padded ``[B, P]`` layout (pad queries see themselves);
        returns the attention output ``[1, T, heads * dim]`` (before the output projection)."""
        rows, slots, (b, p) = packed
        per, d = layer.heads // layer.groups, layer.head_dim
        qkv = _rotated_qkv(layer.qkv(y[0]).view(-1, layer.groups, per + 2, d), per, rope)  # [T, ...]
        kv = self.kv[index]
        kv[:, :, :, :p].zero_()  # pad slots stay masked but must hold finite values (0 * NaN is NaN)
        kv[rows, :, :, slots] = qkv[:, :, per:]
        q = qkv.new_zeros(b, p, layer.heads, d)
        q[rows, slots] = qkv[:, :, :per].reshape(-1, layer.heads, d)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), kv[:, :, 0, :p], kv[:, :, 1, :p],
            attn_mask=mask, is_causal=mask is None, scale=layer.scale,
            enable_gqa=layer.heads != layer.groups,
        )
        return out.transpose(1, 2)[rows, slots].reshape(1, -1, layer.heads * d)

    def _mlp(self, layer, y):
        """The MLP up to (not including) ``fc2``."""
        h = layer.fc1(y)
        if layer.gated:
            gate, linear = torch.chunk(h, 2, dim=-1)
            return layer.activation(gate) * linear
        return layer.activation(h)

    def _layers(self, x, attention):
        for index, layer in enumerate(self.layers):
            x = x + layer.proj(attention(layer, index, layer.input_norm(x)))
            x = x + layer.fc2(self._mlp(layer, layer.mlp_norm(x)))
        return x

    def _logits(self, h):
        """Next-token logits ``[B, vocab_size]`` from last-position hidden states ``[B, h]``."""
        h = self.final_norm(h)
        if self.output_product is not None:
            logits = self.output_product(h, self.output_weight)  # row-major already
        elif self.output_kernel and h.shape[0] <= cpu_kernels.MAX_ROWS:
            logits = h.new_empty(h.shape[0], self.output_weight.shape[0])
            cpu_kernels.product(self.output_weight, h.t(), logits.t())  # written row-major
        else:
            logits = _product(h, self.output_weight)
        if self.output_group is not None:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.output_group)[:, : self.vocab_size]
        # The product's result is a transposed view; token choice reduces along rows
        # (log-softmax, argmax, top-k), which on the view runs strided: at 16 x 32000 a
        # log-softmax takes ~1.0 ms on the view and 0.36 ms after a ~0.5 ms copy, and the
        # two-stage argmax would copy anyway (greedy generation 14-18% faster at vocabulary
        # 32000, unchanged at 2048).
        return logits.contiguous()

    def _rope(self, rows, slots):
        """``(cos, sin_lo, sin_hi)`` for the tokens at ``(rows, slots)`` (index tensors), shaped
        to broadcast over ``[T, groups, per + 1, rot]``; ``None`` without rotary embeddings."""
        if self.rope_table is None:
            return None
        return tuple(t[rows, slots][..., None, None, :] for t in self.rope_table)

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, P]`` (left-padded) -> last-position logits ``[B, vocab_size]``.

        Only real tokens go through the products: the prompts are packed into one row
        (a batch of prompts of 16-64 tokens holds about a third padding)."""
        b, p = tokens.shape
        valid = self.key_valid[:, :p]
        rows, slots = valid.nonzero(as_tuple=True)
        x = self._embed(tokens[rows, slots].unsqueeze(0), self.positions[rows, slots].unsqueeze(0))
        rope = self._rope(rows, slots)
        mask = None  # plain causal attention when no row is padded
        if self.padded:
            causal = torch.ones(p, p, dtype=torch.bool, device=tokens.device).tril_()
            # A pad query attends to itself only, which keeps its (unused) output finite.
            allowed = (causal & valid[:, None, :]) | torch.eye(p, dtype=torch.bool, device=tokens.device)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)
        packed = (rows, slots, (b, p))
        x = self._layers(x, lambda layer, i, y: self._packed_attention(layer, i, y, rope, mask, packed))
        self.length = p
        last = valid.sum(dim=1).cumsum(dim=0) - 1  # each row's last token in the packed row
        return self._logits(x[0, last])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``) at the next slot -> logits ``[B, vocab_size]``.

        Runs on the buffers and views of :class:`_StepPlan`; the residual stream is kept
        transposed (``[h, B]``), as the ``W @ x^T`` products take and give it."""
        plan = self._plan
        if plan is None:
            plan = self._plan = _StepPlan(self)
        slot, end = self.length, self.length + 1
        mask = plan.key_bias.narrow(-1, 0, end) if self.padded else None
        rope = None if plan.rope is None else tuple(t.select(1, slot) for t in plan.rope)  # once for all layers
        positions = self.positions[:, slot:end] if self.embedding.add_position_embedding else None
        x = self._embed(tokens.unsqueeze(1), positions).view(tokens.shape[0], -1)  # [B, h]
        plan.residual_t.copy_(x.t())
        res, b = plan.residual, tokens.shape[0]
        for index, (layer, buf) in enumerate(zip(self.layers, plan.layers)):
            # Layer 0 normalizes the embeddings themselves: the same memory layout, hence
            # the same summation order, as the prefill's and the model's forward.
            y = layer.input_norm(x if index == 0 else res)
            buf.qkv_product(y.t())
            if rope is None:
                buf.rotated.copy_(buf.qkv)
            else:
                buf.rotated.copy_(buf.staged.copy_(buf.qkv))
                buf.rotation(rope)
            buf.kv.select(3, slot).copy_(buf.new_kv)
            if buf.attend is not None:
                out = buf.attend(end)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    buf.queries, buf.keys.narrow(2, 0, end), buf.values.narrow(2, 0, end),
                    attn_mask=mask, scale=layer.scale,
                )
            buf.proj_product(out.view(b, -1).t())
            buf.fc1_product(layer.mlp_norm(res).t())
            if layer.gated:
                a = layer.activation(buf.gate) * buf.linear
            else:
                a = layer.activation(buf.h1)
            buf.fc2_product(a.t())
        self.length = end
        return self._logits(res)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop every row not in ``index`` from the batch and the KV cache."""
        self.kv = [kv[index] for kv in self.kv]
        self._plan = None  # remade for the smaller batch at the next step
        self.positions, self.key_valid = self.positions[index], self.key_valid[index]
        self.key_bias = self.key_bias[index]
        self.padded = bool((~self.key_valid).any())
        if self.rope_table is not None:
            self.rope_table = tuple(t[index] for t in self.rope_table)
