"""Process-group and model-parallel setup.

``initialize`` works under ``torchrun``/``srun`` (reads RANK/WORLD_SIZE/LOCAL_RANK, or
SLURM_* variables) and in a plain single process (it makes a world of one on a free
loopback port). The backend is nccl when CUDA is available, gloo otherwise.
"""

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.utils import cpu_support
from nemo_aligner.utils.ports import free_port


# Servers' other ranks wait in a broadcast between requests: idle time must not time out.
SERVER_TIMEOUT_S = 365 * 24 * 3600


class ParallelConfigError(ValueError):
    """A parallel layout that cannot be built on this world size or model."""


def _env_from_slurm() -> None:
    """Map Slurm's task variables onto torch's when launched by ``srun`` directly."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        os.environ["MASTER_ADDR"] = nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def validate_parallel_layout(world_size: int, tp: int, pp: int, num_layers: int | None = None) -> int:
    """The data-parallel size of the layout; raise ParallelConfigError with the fix when TP/PP
    cannot tile the world or the model."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(
            f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1"
        )
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); launch a multiple of {tp * pp} processes"
        )
    if num_layers is not None and num_layers % pp != 0:
        raise ParallelConfigError(
            f"model.num_layers={num_layers} is not divisible by pipeline_model_parallel_size={pp}; "
            "choose a pipeline size that divides the layer count"
        )
    return world_size // (tp * pp)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (and Megatron's CUDA RNG tracker on GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available() and parallel_state.model_parallel_is_initialized():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: str | None = None,
    seed: int = 1234,
    num_layers: int | None = None,
    timeout_s: float | None = None,
) -> None:
    """Start torch.distributed (if needed) and Megatron's model-parallel groups.

    Re-initializing with a different layout destroys the previous model-parallel groups.
    ``timeout_s`` bounds each collective's wait (torch's default when None).
    """
    _env_from_slurm()
    launched = "RANK" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    validate_parallel_layout(
        world_size, tensor_model_parallel_size, pipeline_model_parallel_size, num_layers
    )

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cpu_support.install()

    if not dist.is_initialized():
        extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if launched:
            dist.init_process_group(
                backend=backend, rank=int(os.environ["RANK"]), world_size=world_size, **extra
            )
        else:
            # A plain process: a world of one, without exporting rendezvous variables
            # that child processes (e.g. torchrun launched from here) would inherit.
            dist.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                rank=0, world_size=1, **extra,
            )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    set_seed(seed)


def is_initialized() -> bool:
    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_global_rank_zero() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` to every rank (trusted, in-process data)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy() -> None:
    """Tear down model-parallel groups and the process group (for tests and re-init)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_within_pipeline(obj):
    """``obj`` from the last pipeline stage, on every stage of this pipeline (trusted data)."""
    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(
        holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]


def run_on_model_parallel_source(fn):
    """``fn()`` computed once per model-parallel group (tensor x pipeline ranks of one
    data-parallel replica), on its first rank, and broadcast to the group.

    An exception raised by ``fn`` is re-raised on every rank of the group, so no rank is left
    waiting in a collective while another has failed.
    """
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return fn()
    return _run_on_first_rank(fn, parallel_state.get_model_parallel_group())


def is_model_parallel_source() -> bool:
    """Whether this rank is the first of its model-parallel group (the one that talks to servers)."""
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return True
    return dist.get_rank() == dist.get_process_group_ranks(parallel_state.get_model_parallel_group())[0]


def run_on_global_rank_zero(fn):
    """``fn()`` computed on global rank 0 and broadcast to every rank; an exception it raises
    is re-raised on every rank (as :func:`run_on_model_parallel_source`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    return _run_on_first_rank(fn, dist.group.WORLD)


def _run_on_first_rank(fn, group):
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) == 1:
        return fn()
    holder = [None]
    if dist.get_rank() == ranks[0]:
        try:
            holder[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            holder[0] = ("error", e)
    dist.broadcast_object_list(holder, src=ranks[0], group=group)
    status, value = holder[0]
    if status == "error":
        raise value
    return value


def all_gather_objects(obj, group=None) -> list:
    """``[obj of rank 0 of group, obj of rank 1, ...]`` on every rank of ``group`` (the world
    by default; trusted data). A group of one (or no process group) returns ``[obj]``
    without a collective: gloo's gather would copy on its worker thread, which then slows
    every later parallel op (see ``cpu_support._one_rank_collectives``)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_data_parallel(obj) -> list:
    """``[obj of data-parallel rank 0, obj of rank 1, ...]`` on every rank (trusted data)."""
    if not dist.is_initialized():
        return [obj]
    return all_gather_objects(obj, group=parallel_state.get_data_parallel_group())
