"""Megatron's tensor-parallel linear layers, at one tensor-parallel rank, as plain linear maps.

At one rank, ``ColumnParallelLinear`` and ``RowParallelLinear`` compute ``x @ W^T (+ b)``,
but through three Python autograd functions a call: the copy to the tensor-parallel region,
``LinearWithGradAccumulationAndAsyncCommunication`` and the reduction from the region, each
an identity or a matmul here, each with a Python forward and backward (~60 us a layer a
step on CPU, for a 2-layer model ~6% of a small DPO step). :class:`ColumnLinear` and
:class:`RowLinear` run ``F.linear`` instead, whose backward is torch's own: the same two
products Megatron's backward makes (``grad @ W`` and ``grad^T @ x``), so the values are the
same. Megatron's DDP gradient hooks do not depend on which function made the gradient.

Every layout or option that needs Megatron's functions keeps them (the layer's own forward
runs): more than one tensor-parallel rank, sequence parallelism, expert parallelism,
gradient-accumulation fusion, deferred embedding weight gradients, CPU activation offloading.

A weight that Megatron's DDP gives a ``main_grad`` buffer (and that no other layer uses) gets
its gradient accumulated there by the product itself (:class:`_LinearIntoMainGrad`):
``main_grad += grad^T @ x`` as one GEMM, where torch's backward makes a new gradient tensor and
DDP's hook then adds it to ``main_grad``, a read and write of every weight a micro-batch
(an 18 M-parameter model: ~4 ms of a ~410 ms step). The ``grad_added_to_main_grad`` flag
tells DDP's hook not to add it again: Megatron's contract for its fused kernels.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _plain(layer) -> bool:
    """Whether ``layer``'s forward is ``x @ W^T (+ b)`` with nothing else to do (fixed for
    the layer's life: it depends on its layout and config only)."""
    plain = layer.__dict__.get("_plain_linear")
    if plain is None:
        config = layer.config
        group = layer.tp_group
        plain = (
            (group is None or group.size() == 1)
            and not layer.sequence_parallel
            and not layer.gradient_accumulation_fusion
            and not getattr(layer, "explicit_expert_comm", False)
            and not getattr(config, "defer_embedding_wgrad_compute", False)
            and getattr(config, "_cpu_offloading_context", None) is None
        )
        layer.__dict__["_plain_linear"] = plain
    return plain


def _into_main_grad(weight) -> bool:
    """Whether ``weight``'s gradient can go straight into its DDP ``main_grad`` (see module doc)."""
    return (
        weight.requires_grad
        and torch.is_grad_enabled()
        and hasattr(weight, "grad_added_to_main_grad")
        and getattr(weight, "main_grad", None) is not None
        and weight.main_grad.dtype == weight.dtype
        # a tied embedding: the embedding's own gradient reaches .grad, which the flag would drop
        and not getattr(weight, "shared", False)
        and not getattr(weight, "shared_embedding", False)
    )


class _LinearIntoMainGrad(torch.autograd.Function):
    """``y = x @ W^T``; backward: ``dx = dy @ W``, ``W.main_grad += dy^T @ x`` (one GEMM, in
    place), and a placeholder weight gradient (uninitialized, never read: DDP's hook sees
    ``grad_added_to_main_grad`` and drops it)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        weight.main_grad.addmm_(flat_grad.t(), x.reshape(-1, x.shape[-1]))
        weight.grad_added_to_main_grad = True
        return grad_x, torch.empty_like(weight)


def _linear(x, weight):
    """``F.linear(x, weight)`` for a layer's own weight: into ``main_grad`` where it can be."""
    if _into_main_grad(weight):
        return _LinearIntoMainGrad.apply(x, weight)
    return F.linear(x, weight)


class ColumnLinear(ColumnParallelLinear):
    """A ``ColumnParallelLinear`` that is a plain linear map where it can be (see module doc)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not _plain(self) or (weight is None and self.weight is None) or (
            weight is not None and tuple(weight.shape) != (self.output_size_per_partition, self.input_size)
        ):
            return super().forward(input_, weight, runtime_gather_output)  # (or its error)
        # (a weight passed in, such as a tied output layer's embedding, is used by another layer too)
        output = _linear(input_, self.weight) if weight is None else F.linear(input_, weight)
        if self.skip_bias_add:
            return output, self.bias
        return (output if self.bias is None else output + self.bias), None


class RowLinear(RowParallelLinear):
    """A ``RowParallelLinear`` that is a plain linear map where it can be (see module doc)."""

    def forward(self, input_):
        if not _plain(self):
            return super().forward(input_)
        output = _linear(input_, self.weight)
        if self.skip_bias_add:
            return output, self.bias
        return (output if self.bias is None else output + self.bias), None


def use_plain_linears(model: torch.nn.Module) -> None:
    """Make every ``ColumnParallelLinear`` / ``RowParallelLinear`` (exactly those classes, not
    subclasses with a forward of their own) in ``model`` a :class:`ColumnLinear` /
    :class:`RowLinear`, in place (parameters, hooks and state dict unchanged)."""
    swaps = {ColumnParallelLinear: ColumnLinear, RowParallelLinear: RowLinear}
    for module in model.modules():
        new = swaps.get(type(module))
        if new is not None:
            module.__class__ = new
