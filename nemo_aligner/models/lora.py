"""LoRA adapters on Megatron-Core's linear layers, sharded as Megatron/NeMo shard them.

A LoRA adapter adds a low-rank update to a frozen linear layer ``y = W x``::

    y = W x + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r]

with ``A`` drawn with ``column_init_method`` (xavier by default) and ``B`` with
``row_init_method`` (zero by default), so that a fresh adapter leaves the model unchanged.

Sharding follows the base layer, so the adapter's output is sharded exactly like the
layer's own output and no extra communication is needed beyond Megatron's own:

- column-parallel layers (``linear_qkv``, ``linear_fc1``): ``A`` is replicated, ``B`` is a
  ``ColumnParallelLinear`` (its input is copied to the TP region, whose backward all-reduces
  the gradient reaching ``A``);
- row-parallel layers (``linear_proj``, ``linear_fc2``): ``A`` is a ``RowParallelLinear`` on
  the sharded input (its output all-reduced), ``B`` is replicated.

The adapters of a transformer layer live in its child module ``lora`` (checkpoint keys
``decoder.layers.lora.<linear>.linear_in/out.weight``; ``B`` of a gated ``linear_fc1`` uses
Megatron's gate/up split so checkpoints reshard across TP sizes). A forward hook on each base
linear adds the adapter's output, so the base modules and their parameter names stay as they
are. NeMo's config keys (``model.peft``) select the layers and modules; see :class:`LoRASettings`.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from nemo_aligner.utils.config import cfg_get

# NeMo's target-module names -> (submodule of the transformer layer, linear, parallel kind)
TARGETS = {
    "attention_qkv": ("self_attention", "linear_qkv", "column"),
    "attention_dense": ("self_attention", "linear_proj", "row"),
    "mlp_fc1": ("mlp", "linear_fc1", "column"),
    "mlp_fc2": ("mlp", "linear_fc2", "row"),
}
GROUPS = {
    "attention": ("attention_qkv", "attention_dense"),
    "mlp": ("mlp_fc1", "mlp_fc2"),
    "all": tuple(TARGETS),
}
_PARENTS = {linear: parent for parent, linear, _ in TARGETS.values()}  # linear_qkv -> self_attention, ...
INIT_METHODS = ("xavier", "normal", "kaiming", "zero")
ADAPTER_KEY = ".lora."  # in every adapter parameter's name, and nowhere else


class LoRAConfigError(ValueError):
    """A ``model.peft`` value that cannot be built."""


@dataclass(frozen=True)
class LoRASettings:
    """``model.peft.lora_tuning.*`` (NeMo's keys), parsed and checked once."""

    target_modules: tuple  # NeMo names, expanded ("attention" -> attention_qkv, attention_dense)
    adapter_dim: int = 32
    alpha: float = 32.0
    adapter_dropout: float = 0.0
    column_init_method: str = "xavier"  # A (linear_in)
    row_init_method: str = "zero"  # B (linear_out)
    layer_selection: tuple | None = None  # 1-based global layer numbers; None: every layer
    restore_from_path: str | None = None  # saved adapters to continue from

    @property
    def scale(self) -> float:
        return self.alpha / self.adapter_dim

    @property
    def linears(self) -> tuple:
        """The Megatron linear names adapted, e.g. ``("linear_qkv", "linear_proj")``."""
        return tuple(TARGETS[t][1] for t in self.target_modules)

    @classmethod
    def from_model_cfg(cls, model_cfg) -> "LoRASettings | None":
        """The settings of ``model.peft`` (``None`` when ``peft_scheme`` is ``none`` or unset)."""
        scheme = str(cfg_get(model_cfg, "peft.peft_scheme", "none") or "none").lower()
        if scheme == "none":
            return None
        if scheme != "lora":
            raise LoRAConfigError(f"model.peft.peft_scheme={scheme!r}; choose none or lora")
        tuning = cfg_get(model_cfg, "peft.lora_tuning", None) or {}
        names = tuning.get("target_modules", ["attention_qkv"])
        if isinstance(names, str):
            names = [names]
        targets = []
        for name in names:
            if name in GROUPS:
                expanded = GROUPS[name]
            elif name in TARGETS:
                expanded = (name,)
            else:
                raise LoRAConfigError(
                    f"model.peft.lora_tuning.target_modules: unknown module {name!r}; choose from "
                    f"{sorted(TARGETS) + sorted(GROUPS)}"
                )
            targets += [t for t in expanded if t not in targets]
        if not targets:
            raise LoRAConfigError("model.peft.lora_tuning.target_modules is empty; name at least one module")
        dim = tuning.get("adapter_dim", 32)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise LoRAConfigError(f"model.peft.lora_tuning.adapter_dim={dim!r}; give a whole number >= 1")
        alpha = tuning.get("alpha", None)
        alpha = float(dim if alpha is None else alpha)  # NeMo: alpha defaults to adapter_dim
        dropout = float(tuning.get("adapter_dropout", 0.0) or 0.0)
        if not 0.0 <= dropout < 1.0:
            raise LoRAConfigError(f"model.peft.lora_tuning.adapter_dropout={dropout}; give a value in [0, 1)")
        inits = {}
        for key, default in (("column_init_method", "xavier"), ("row_init_method", "zero")):
            inits[key] = str(tuning.get(key, default)).lower()
            if inits[key] not in INIT_METHODS:
                raise LoRAConfigError(f"model.peft.lora_tuning.{key}={inits[key]!r}; choose one of {INIT_METHODS}")
        layers = tuning.get("layer_selection", None)
        if layers is not None:
            layers = tuple(int(n) for n in layers)
            num_layers = cfg_get(model_cfg, "num_layers", None)
            bad = [n for n in layers if n < 1 or (num_layers is not None and n > int(num_layers))]
            if bad:
                raise LoRAConfigError(
                    f"model.peft.lora_tuning.layer_selection has {bad}: layers are numbered 1..{num_layers}"
                )
        restore = cfg_get(model_cfg, "peft.restore_from_path", None)
        return cls(tuple(targets), dim, alpha, dropout, inits["column_init_method"], inits["row_init_method"],
                   layers, None if restore is None else str(restore))


def _draw(shape, method: str, generator) -> torch.Tensor:
    """A global ``[out, in]`` matrix for ``method`` (NeMo's choices), in float32."""
    full = torch.empty(shape, dtype=torch.float32)
    fan_out, fan_in = shape
    if method == "zero":
        return full.zero_()
    if method == "xavier":  # xavier_normal_
        return full.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    if method == "normal":
        return full.normal_(0.0, 0.2, generator=generator)
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
    return full.uniform_(-bound, bound, generator=generator)


class LoRAAdapter(MegatronModule):
    """``(alpha / r) * B A dropout(x)`` for one base linear, sharded like it (see the module doc)."""

    def __init__(self, config, kind: str, in_features: int, out_features: int, settings: LoRASettings,
                 gated: bool = False):
        super().__init__(config=config)
        r = settings.adapter_dim
        self.kind = kind
        self.gated = gated  # B holds [gate; up] shards (Megatron's gated linear_fc1)
        self.scale = settings.scale
        self.dropout = torch.nn.Dropout(settings.adapter_dropout) if settings.adapter_dropout > 0 else None
        self.enabled = True
        zero = torch.nn.init.zeros_  # drawn layout-invariantly afterwards (init_adapters)
        if kind == "column":
            self.linear_in = torch.nn.Linear(in_features, r, bias=False, dtype=config.params_dtype)
            self.linear_out = ColumnParallelLinear(r, out_features, config=config, init_method=zero, bias=False,
                                                   gather_output=False, skip_bias_add=True)
            replicated = self.linear_in.weight
        else:
            self.linear_in = RowParallelLinear(in_features, r, config=config, init_method=zero, bias=False,
                                               input_is_parallel=True, skip_bias_add=True)
            self.linear_out = torch.nn.Linear(r, out_features, bias=False, dtype=config.params_dtype)
            replicated = self.linear_out.weight
        # Under sequence parallelism each TP rank sees part of the sequence: the replicated
        # matrix's gradient is then partial and Megatron all-reduces it like a norm's.
        replicated.sequence_parallel = bool(config.sequence_parallel)

    def _linear(self, module, x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x):
        if self.dropout is not None:
            x = self.dropout(x)
        return self._linear(self.linear_out, self._linear(self.linear_in, x)) * self.scale

    def delta(self) -> torch.Tensor:
        """This rank's shard of ``(alpha / r) B A``, shaped like the base layer's local weight."""
        return (self.linear_out.weight.float() @ self.linear_in.weight.float()) * self.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.gated:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}linear_out.weight"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


class LoRALayer(MegatronModule):
    """The adapters of one transformer layer, one child per adapted linear."""


def _add_adapter_output(adapter):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        out, bias = output
        return out + adapter(args[0]).to(out.dtype), bias

    return hook


def apply_lora(model, settings: LoRASettings, seed: int = 1234, also_train=()):
    """Add adapters to ``model`` (this rank's ``GPTModel`` chunk, not DDP-wrapped) in place and
    freeze every other parameter, except those whose names start with one of ``also_train``
    (e.g. a reward model's new head; they are then saved with the adapters). Adapter weights
    depend only on ``seed`` and their checkpoint key, whatever the parallel layout. Returns
    ``model``."""
    if has_lora(model):
        raise LoRAConfigError("the model already has LoRA adapters")
    also_train = tuple(also_train)
    for name, param in model.named_parameters():
        param.requires_grad_(bool(also_train) and name.startswith(also_train))
    config = model.config
    for layer in model.decoder.layers:
        if settings.layer_selection is not None and layer.layer_number not in settings.layer_selection:
            continue
        adapters = LoRALayer(config=config)
        for target in settings.target_modules:
            parent, name, kind = TARGETS[target]
            base = getattr(getattr(layer, parent), name)
            if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
                raise LoRAConfigError(
                    f"LoRA needs Megatron's local linear layers; {parent}.{name} is {type(base).__name__} "
                    "(Transformer Engine's fused layers are not supported: run without Transformer Engine)"
                )
            gated = name == "linear_fc1" and config.gated_linear_unit
            adapter = LoRAAdapter(config, kind, base.input_size, base.output_size, settings, gated=gated)
            adapters.add_module(name, adapter)
            adapter.hook = base.register_forward_hook(_add_adapter_output(adapter))
        layer.add_module("lora", adapters)
    model.lora_settings = settings
    # Checkpoints hold what trains: the adapters (and any also_train parameters).
    model.checkpoint_key_filter = lambda key: is_adapter_key(key) or (bool(also_train) and key.startswith(also_train))
    init_adapters(model, seed)
    return model


def has_lora(model) -> bool:
    return getattr(_unwrap(model), "lora_settings", None) is not None


def _unwrap(model):
    if isinstance(model, (list, tuple)):
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


def adapters(model) -> list[LoRAAdapter]:
    return [m for m in _unwrap(model).modules() if isinstance(m, LoRAAdapter)]


def is_adapter_key(name: str) -> bool:
    return ADAPTER_KEY in f".{name}"


def _is_plain_key(name: str) -> bool:
    return not is_adapter_key(name)


@torch.no_grad()
def init_adapters(model, seed: int) -> None:
    """Draw ``A`` and ``B`` as :class:`LoRASettings` says, each global matrix from a generator
    seeded by its checkpoint key, then keep this rank's shard (layout-invariant, like
    :func:`nemo_aligner.models.gpt.init_weights_layout_invariant`)."""
    from nemo_aligner.models.gpt import _iter_sharded_tensors, _stable_seed

    model = _unwrap(model)
    settings = model.lora_settings
    for sh in _iter_sharded_tensors(model.sharded_state_dict()):
        if ADAPTER_KEY not in f".{sh.key}":
            continue
        method = settings.column_init_method if ".linear_in." in sh.key else settings.row_init_method
        prepend = sh.prepend_axis_num
        shape = tuple(sh.global_shape[prepend:])
        gen = torch.Generator().manual_seed(_stable_seed(seed, sh.key, tuple(sh.global_offset[:prepend])))
        full = _draw(shape, method, gen)
        offsets = sh.global_offset[prepend:]
        slices = tuple(slice(o, o + n) for o, n in zip(offsets, sh.data.shape))
        sh.data.copy_(full[slices].reshape(sh.data.shape).to(sh.data.dtype))


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model inside: every adapter off (e.g. the reference policy of DPO or RL)."""
    found = adapters(model)
    previous = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a, state in zip(found, previous):
            a.enabled = state


def reference_context(model):
    """:func:`adapters_disabled` for a LoRA model, else a no-op context."""
    return adapters_disabled(model) if has_lora(model) else contextlib.nullcontext()


def adapted_linears(model):
    """``(base linear, adapter)`` pairs of ``model``."""
    model = _unwrap(model)
    pairs = []
    for layer in model.decoder.layers:
        lora = getattr(layer, "lora", None)
        if lora is None:
            continue
        for name, adapter in lora.named_children():
            pairs.append((getattr(getattr(layer, _PARENTS[name]), name), adapter))
    return pairs


@torch.no_grad()
def merge_lora(model) -> None:
    """Fold every adapter into its base weight in place (``W += (alpha / r) B A``) and switch
    the adapters off for good: the model computes the same function with plain weights (for the
    final model, an export, or an engine copy). Collective-free: each rank merges its shards."""
    for base, adapter in adapted_linears(model):
        if getattr(adapter, "merged", False):
            continue
        base.weight.add_(adapter.delta().to(base.weight.dtype))
        adapter.enabled = False
        adapter.merged = True
    _unwrap(model).lora_merged = True
    _unwrap(model).checkpoint_key_filter = _is_plain_key  # a merged model saves its plain weights


def strip_lora(model) -> None:
    """Merge the adapters and remove them: ``model`` becomes a plain ``GPTModel`` (not for a
    DDP-wrapped model, whose buffers hold the adapter parameters)."""
    merge_lora(model)
    model = _unwrap(model)
    for base, adapter in adapted_linears(model):
        adapter.hook.remove()
    for layer in model.decoder.layers:
        if hasattr(layer, "lora"):
            del layer.lora
    for attr in ("lora_settings", "lora_merged", "checkpoint_key_filter"):
        if hasattr(model, attr):
            delattr(model, attr)


def is_merged(model) -> bool:
    return bool(getattr(_unwrap(model), "lora_merged", False))


def merged_weights(model) -> dict:
    """``name -> tensor`` of this rank's parameters with the adapters folded in (new tensors
    only for adapted weights; adapter parameters left out): what an engine holding plain
    weights copies at refit."""
    model = _unwrap(model)
    deltas = {id(base.weight): adapter for base, adapter in adapted_linears(model)}
    out = {}
    for name, param in model.named_parameters():
        if is_adapter_key(name):
            continue
        adapter = deltas.get(id(param))
        out[name] = param if adapter is None or not adapter.enabled else param + adapter.delta().to(param.dtype)
    return out


def trainable_fraction(model) -> float:
    params = list(_unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / max(total, 1)
