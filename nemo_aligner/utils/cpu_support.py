"""Run Megatron-Core on machines without CUDA.

Megatron-Core assumes a GPU in a handful of places that have nothing to do with the
math: scratch tensors created with ``device="cuda"`` (pipeline schedules, DDP buffers,
gradient-norm reductions), ``torch.cuda.current_device()`` used as a device, and one
assertion that gradients are CUDA tensors before clipping. This module answers those
places on CPU and nowhere else:

- :func:`install` (process-wide, idempotent, only when CUDA is unavailable) makes
  ``torch.cuda.current_device()`` return ``"cpu"`` (RoPE and buffers ask for it) and
  ``torch.cuda.synchronize()`` a no-op (pipeline p2p calls it).
- :func:`cuda_on_cpu` is a context manager that maps ``device="cuda"`` to CPU, makes
  ``Tensor.cuda()`` a no-op and reports CPU tensor types under their CUDA names (the
  optimizers check ``param.type()`` and ``grad.type()`` against ``torch.cuda.*``). Inside
  it, collectives over a group of one run in place, not through gloo (see
  :func:`_one_rank_collectives`). It intercepts every torch call while active (~3 us
  each), so callers enter it only around Megatron calls that create CUDA scratch tensors
  (schedules, DDP construction, the optimizer's build, gradient norm and clipping), and
  lift it with :func:`native_torch` around the model's forward inside a schedule.

On a CUDA machine both are no-ops.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def needs_cpu_support() -> bool:
    return not torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placement requests to CPU for the duration of the mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        local = _LOCAL.get(func)  # filled when the mode is entered (cuda_on_cpu)
        if local is not None and local(*args, **kwargs):
            return None
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers accept only "torch.cuda.*Tensor" type names.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_LOCAL: dict = {}
_PLAIN_OPS = None


def runs_locally(group, op=None, async_op=False) -> bool:
    """Whether a collective over ``group`` is its own result on this rank: a synchronous call
    over a group of one, with no reduction or a sum, average, max or min (the others, rare,
    go to the real collective)."""
    global _PLAIN_OPS
    import torch.distributed as dist

    if async_op or not dist.is_available() or not dist.is_initialized():
        return False
    if _PLAIN_OPS is None:
        R = dist.ReduceOp
        _PLAIN_OPS = {None, R.SUM, R.AVG, R.MAX, R.MIN}
    return op in _PLAIN_OPS and dist.get_world_size(group) == 1


def _one_rank_collectives() -> dict:
    """``{collective: run}``: ``run(*args, **kwargs)`` does the collective in place and returns
    True when the call is synchronous over a group of one; otherwise it returns False and the
    real collective runs.

    Over one rank every reduction leaves its tensor as it is and every gather or scatter is a
    copy, but gloo makes its copies on a worker thread of its own. A copy large enough for
    ATen to split gives that thread an OpenMP pool for the rest of the process; with more
    pooled threads than cores, libgomp stops spin-waiting in every pool, and each parallel op
    of the training loop then waits for its threads to wake. Measured on 2 cores: every DPO
    step after the first checkpoint save (the distributed optimizer gathers its state over
    the data-parallel group) took twice as long. Asynchronous calls always run for real (the
    caller waits on the work they return)."""
    if _LOCAL:
        return _LOCAL
    import inspect

    import torch.distributed as dist

    if not dist.is_available():
        return _LOCAL

    def copy(dst, src):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src.reshape(dst.shape))

    bodies = {
        dist.all_reduce: lambda a: None,
        dist.broadcast: lambda a: None,
        dist.reduce: lambda a: None,
        dist.all_gather: lambda a: copy(a["tensor_list"][0], a["tensor"]),
        dist.gather: lambda a: a["gather_list"] and copy(a["gather_list"][0], a["tensor"]),
        dist.scatter: lambda a: a["scatter_list"] and copy(a["tensor"], a["scatter_list"][0]),
    }

    def in_place(collective, body):
        signature = inspect.signature(collective)

        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if not runs_locally(a["group"], a.get("op"), a["async_op"]):
                return False
            body(a)
            return True

        return run

    _LOCAL.update({collective: in_place(collective, body) for collective, body in bodies.items()})
    return _LOCAL


@contextlib.contextmanager
def cuda_on_cpu():
    """Within this block, tensors requested on CUDA are made on CPU (no-op with CUDA)."""
    if not needs_cpu_support():
        yield
        return
    _one_rank_collectives()
    with _CudaToCpuMode():
        yield


@contextlib.contextmanager
def native_torch():
    """Suspend :func:`cuda_on_cpu` inside it (for the model's forward within a schedule).

    The redirecting mode sees every torch call; the model itself needs none of it, and
    lifting it for the forward pass removes its per-op Python overhead.
    """
    if isinstance(torch.overrides._get_current_function_mode(), _CudaToCpuMode):
        with torch.overrides._pop_mode_temporarily():
            yield
    else:
        yield


def _current_device_cpu():
    return "cpu"


def _synchronize_nothing(device=None):
    """CPU work is synchronous; pipeline p2p calls this after every send/recv."""


def install() -> None:
    """Patch the CUDA-only spots Megatron-Core reaches outside of :func:`cuda_on_cpu`."""
    global _installed
    if _installed or not needs_cpu_support():
        return
    torch.cuda.current_device = _current_device_cpu
    torch.cuda.synchronize = _synchronize_nothing
    _installed = True
