"""Pushing a training model's weights into an engine's own weight copy, in place.

:class:`WeightCopier` pairs every parameter of the engine's model with the training
model's parameter of the same name once, then each ``copy_from`` is one ``copy_`` per
parameter into the engine's preallocated tensors: no allocation, ``data_ptr`` unchanged,
dtype converted on the fly (e.g. a float32 trainer feeding a bf16 engine).

Both models must have the same tensor-parallel layout (each rank copies its own shard).
"""

import torch

from nemo_aligner.generation.engine import GenerationError


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16 wrappers (anything exposing ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


class WeightCopier:
    """Copies parameters by name into ``target``'s existing tensors."""

    def __init__(self, target):
        self.target = target
        self._source_id = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _pair(self, source) -> None:
        src = dict(source.named_parameters())
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
        self._source_id = id(source)

    @torch.no_grad()
    def copy_from(self, source) -> None:
        if id(source) != self._source_id:
            self._pair(source)
        for dst, src in self._pairs:
            dst.copy_(src)
