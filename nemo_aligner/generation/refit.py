"""Pushing a training model's weights into an engine's own weight copy, in place.

Both copiers pair every parameter of the engine's model with its source once, then each
``copy_from`` writes into the engine's preallocated tensors: no allocation, ``data_ptr``
unchanged, dtype converted on the fly (e.g. a float32 trainer feeding a bf16 engine). Both
models have the same tensor-parallel layout (each rank handles its own TP shard).

- :class:`WeightCopier`: the training model holds every layer (PP=1): one ``copy_`` per
  parameter.
- :class:`PipelineGatherCopier`: the training model is pipeline-parallel; the engine's model
  holds every layer on every pipeline rank ("pipeline stages folded into data
  parallelism": each stage's ranks then generate their own prompts). Each parameter is
  broadcast over the pipeline group from the stage that owns it, straight into the
  engine's tensor. :func:`folded_process_groups` gives the engine model's process groups
  (the training TP group, a pipeline group of one).
"""

import weakref

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.generation.engine import GenerationError
from nemo_aligner.models.lora import has_lora, is_adapter_key, is_merged, merged_weights
from nemo_aligner.utils.distributed import all_gather_objects

_SINGLETON_GROUPS = {}


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16 wrappers (anything exposing ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


class WeightCopier:
    """Copies parameters by name into ``target``'s existing tensors."""

    def __init__(self, target):
        self.target = target
        self._source = lambda: None  # weak reference to the model the pairs were made for
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _pair(self, source) -> None:
        src = {n: p for n, p in source.named_parameters() if not is_adapter_key(n)}
        pairs = []
        for name, dst in self.target.named_parameters():
            if name not in src:
                raise GenerationError(
                    f"the training model has no parameter {name!r}; refit needs the same "
                    "architecture (and pipeline_model_parallel_size=1) on both sides"
                )
            if src[name].shape != dst.shape:
                raise GenerationError(
                    f"parameter {name!r} is {tuple(src[name].shape)} in the training model and "
                    f"{tuple(dst.shape)} in the engine; build the engine at the training "
                    "tensor_model_parallel_size"
                )
            pairs.append((dst, src[name]))
        self._pairs = pairs
        self._names = [(name, dst) for name, dst in self.target.named_parameters()]
        self._source = weakref.ref(source)

    @torch.no_grad()
    def copy_from(self, source) -> None:
        # Identity, not id(): a new model may reuse a freed one's id.
        if self._source() is not source:
            self._pair(source)
        if has_lora(source) and not is_merged(source):
            # LoRA: the engine holds plain weights; the adapted ones arrive merged.
            merged = merged_weights(source)
            for name, dst in self._names:
                dst.copy_(merged[name])
            return
        for dst, src in self._pairs:
            dst.copy_(src)


def folded_process_groups():
    """Process groups for an engine model that holds every layer on this rank: tensor and
    context parallelism as in training, a pipeline group of this rank alone, no embedding
    group (nothing to tie across stages). Collective the first time (every rank creates
    every one-rank group, as ``new_group`` requires)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    if world not in _SINGLETON_GROUPS:
        _SINGLETON_GROUPS[world] = [dist.new_group([r]) for r in range(world)]
    groups = ProcessGroupCollection()
    groups.tp = parallel_state.get_tensor_model_parallel_group()
    groups.cp = parallel_state.get_context_parallel_group()
    groups.pp = _SINGLETON_GROUPS[world][dist.get_rank()]
    groups.embd = None
    return groups


def _global_names(model) -> dict[str, torch.Tensor]:
    """This stage's parameters under full-model names (``decoder.layers.<global index>``)."""
    numbers = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)}
    named = {}
    params = merged_weights(model) if has_lora(model) and not is_merged(model) else dict(model.named_parameters())
    for name, param in params.items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = numbers[parts[2]]
        named[".".join(parts)] = param
    return named


class PipelineGatherCopier:
    """Fills a full-depth engine model from a pipeline-parallel training model (collective
    over the pipeline group: every stage calls ``copy_from`` with its own chunk)."""

    def __init__(self, target):
        self.target = target
        self._source = lambda: None  # weak reference to the model the plan was made for
        self._plan: list[tuple[torch.Tensor, str | None, int]] = []  # (engine tensor, name held here, owner rank)
        self.group = parallel_state.get_pipeline_model_parallel_group()

    def _pair(self, source) -> None:
        mine = _global_names(source)
        held = all_gather_objects({name: tuple(p.shape) for name, p in mine.items()}, group=self.group)
        ranks = dist.get_process_group_ranks(self.group)
        stage = dist.get_rank(self.group)
        plan = []
        for name, dst in self.target.named_parameters():
            owners = [k for k, names in enumerate(held) if name in names]
            if not owners:
                raise GenerationError(
                    f"no pipeline stage of the training model holds {name!r}; refit needs the same "
                    "architecture on both sides"
                )
            owner = owners[0]
            if held[owner][name] != tuple(dst.shape):
                raise GenerationError(
                    f"parameter {name!r} is {held[owner][name]} in the training model and "
                    f"{tuple(dst.shape)} in the engine; build the engine at the training "
                    "tensor_model_parallel_size"
                )
            plan.append((dst, name if owner == stage else None, ranks[owner]))
        self._plan = plan
        self._source = weakref.ref(source)

    @torch.no_grad()
    def copy_from(self, source) -> None:
        if self._source() is not source:
            self._pair(source)
        # This stage's tensors by name (LoRA: the merged weights, new tensors at every refit).
        mine = _global_names(source)
        for dst, name, owner in self._plan:
            if name is not None:
                dst.copy_(mine[name])
            dist.broadcast(dst, src=owner, group=self.group)
