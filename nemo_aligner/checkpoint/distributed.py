"""Checkpoints with Megatron ``dist_checkpointing``: atomic, resumable, reshardable.

A checkpoint is one directory::

    <name>/
      metadata.json, common.pt, *.distcp   model (+ optimizer) shards, dist_checkpointing format
      trainer_state.json                   step, consumed_samples, epoch, scheduler, metrics
      model_config.yaml                    the ``model.*`` config it was trained with
      tokenizer/                           the tokenizer files, when known

Writes go to ``<name>.tmp-<pid>`` and are renamed into place after every rank has
finished, so a crash mid-save leaves the previous checkpoints intact. Loading at another
TP/PP layout works because ``dist_checkpointing`` stores global tensors; the optimizer
state is saved in the fully reshardable format for the same reason. Per-rank RNG states
are saved as sharded objects so that resuming continues the same random streams.
"""

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import OmegaConf

from nemo_aligner.checkpoint.output import check_output_dir, replace_dir
from nemo_aligner.checkpoint.verify import install_safe_object_loading, verify_checkpoint
from nemo_aligner.checkpoint.writers import use_in_process_writers
from nemo_aligner.data.tokenizers import copy_tokenizer_files
from nemo_aligner.utils.cpu_support import cuda_on_cpu
from nemo_aligner.utils.distributed import barrier, broadcast_object, is_global_rank_zero
from nemo_aligner.utils.errors import RunError
from nemo_aligner.utils.optim import fuse_torch_adam, optimizer_calls

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.yaml"
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (a full disk, a file-size limit, an I/O error)."""


class NonFiniteWeightsError(RunError):
    """A save of weights holding NaN or infinite values (a diverged run)."""


def is_checkpoint(path) -> bool:
    """True for a directory written by :func:`save_checkpoint`."""
    p = Path(path)
    return p.is_dir() and (p / "metadata.json").is_file() and (p / MODEL_CONFIG).is_file()


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_sharded_state_dict(model_chunks):
    """The model's sharded state, limited to what it saves: a model with a
    ``checkpoint_key_filter(name) -> bool`` (LoRA: the adapters only, or after a merge the plain
    weights only) saves and loads just the keys the filter keeps."""
    if len(model_chunks) != 1:
        raise NotImplementedError("virtual pipeline (several model chunks) is not supported")
    module = _unwrap(model_chunks[0])
    sharded = module.sharded_state_dict()
    keep = getattr(module, "checkpoint_key_filter", None)
    return sharded if keep is None else {k: v for k, v in sharded.items() if keep(k)}


def _load_model_state(module, state: dict, strict: bool) -> None:
    keep = getattr(module, "checkpoint_key_filter", None)
    if keep is None:
        module.load_state_dict(state, strict=strict)
        return
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if keep(k) and not k.endswith("_extra_state")]
    if strict and missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors of this model (first: {missing[0]})")


def _layout() -> list[int]:
    ps = parallel_state
    return [
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    ]


def _rng_sharded_object(state=None):
    """This rank's RNG state as a ShardedObject indexed by (pp, tp, dp) rank."""
    ps = parallel_state
    pp, tp, dp = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    if state is None:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }
    return ShardedObject("rng_state", state, shape, (pp, tp, dp), replica_id=0)


def _restore_rng(state) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_finite(model_chunks, where) -> None:
    """Raise :class:`NonFiniteWeightsError` (on every rank) when any rank holds a NaN or
    infinite parameter; collective."""
    bad = torch.zeros(1, dtype=torch.int64)
    for chunk in model_chunks:
        for name, p in _unwrap(chunk).named_parameters():
            if not torch.isfinite(p.detach()).all():
                bad[0] = 1
                break
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteWeightsError(
            f"the weights hold NaN or infinite values; {where} was not written (the last checkpoint is the last "
            "finite one): lower model.optim.lr or check the data"
        )


def save_checkpoint(
    path,
    model_chunks,
    model_cfg,
    optimizer=None,
    trainer_state: dict | None = None,
    tokenizer_dir=None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (collective: every rank must call it).

    ``extra``: more sharded state to store beside the model's, ``{name: sharded dict}`` (e.g.
    SPIN's reference weights, see :func:`load_extra`).

    Refused before anything is written: weights that are not finite, and a ``path`` that is
    a file or a non-empty directory other than one of our checkpoints (unless ``overwrite``).
    An earlier checkpoint at ``path`` is replaced only once the new one is complete; a write
    that fails (a full disk) removes its partial directory and leaves the old one as it was.
    """
    path = Path(path)
    check_finite(model_chunks, path)
    refusal = None
    if is_global_rank_zero():
        try:
            check_output_dir(path, is_checkpoint, overwrite, what=str(path), hint="overwrite=True")
        except ValueError as e:
            refusal = str(e)
    refusal = broadcast_object(refusal)
    if refusal:
        raise CheckpointError(refusal)
    tmp = path.with_name(f"{path.name}.tmp-{broadcast_object(os.getpid())}")
    try:
        _write_checkpoint(tmp, path, model_chunks, model_cfg, optimizer, trainer_state, tokenizer_dir, extra)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- OSError, a worker's error, torch's (a BaseException)
        if is_global_rank_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        reason = (getattr(e, "strerror", None) or str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        raise CheckpointWriteError(
            f"writing {path} failed ({reason[:200]}; {free / 2**20:.0f} MiB free there: a full disk or a file-size "
            "limit?); the partial copy was removed and earlier checkpoints are untouched"
        ) from None
    return path


def _write_checkpoint(tmp, path, model_chunks, model_cfg, optimizer, trainer_state, tokenizer_dir, extra=None) -> None:
    if is_global_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    sharded = {"model": _model_sharded_state_dict(model_chunks)}
    if optimizer is not None:
        with optimizer_calls():
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], is_loading=False, metadata=OPTIM_SHARDING
            )
        sharded["rng_state"] = _rng_sharded_object()
    for name, part in (extra or {}).items():
        if name in sharded:
            raise ValueError(f"extra checkpoint state may not be named {name!r}")
        sharded[name] = part
    use_in_process_writers()
    with cuda_on_cpu():
        dist_checkpointing.save(sharded, str(tmp))
    if is_global_rank_zero():
        state = dict(
            trainer_state or {}, has_optimizer_state=optimizer is not None, layout_pp_tp_dp=_layout()
        )
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        OmegaConf.save(OmegaConf.create(model_cfg), tmp / MODEL_CONFIG)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        replace_dir(tmp, path)
    barrier()


def _copy_provided_optimizer_states(self, model_param, tensors):
    """Copy the loaded main param and moments into the optimizer, key by key as provided.

    Megatron's version copies every key of the live state, including torch Adam's "step",
    which the fully reshardable format restores separately (from ``param_groups``) and
    does not pass here, so loading fails without apex / Transformer Engine.
    """
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        dst[key].copy_(value)


def _patch_reshardable_optimizer_loading() -> None:
    from megatron.core.optimizer import distrib_optimizer as mod

    if mod.HAVE_APEX_OR_TE or getattr(mod.DistributedOptimizer, "_nemo_aligner_patched", False):
        return
    original = mod.DistributedOptimizer._set_main_param_and_optimizer_states

    def patched(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        return _copy_provided_optimizer_states(self, model_param, tensors)

    mod.DistributedOptimizer._set_main_param_and_optimizer_states = patched
    mod.DistributedOptimizer._nemo_aligner_patched = True


def _prepare_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer placeholder state to load into.

    Without apex/Transformer Engine, Megatron's ``DistributedOptimizer.state_dict()`` reads
    the step count from the inner optimizer's state, which does not exist before the first
    step; Megatron's own placeholder initialization runs too late on that path.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _patch_reshardable_optimizer_loading()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_step_counters(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after loading.

    Megatron's loader (without apex / Transformer Engine) puts one shared ``step`` tensor
    into every parameter's state; torch's foreach Adam increments each parameter's step in
    place, so a shared tensor advances once per parameter and corrupts bias correction.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def load_checkpoint(path, model_chunks, optimizer=None, strict=True) -> dict:
    """Load model (and optimizer + RNG when given) from ``path``; returns the trainer state.

    Works at any TP/PP layout. With ``optimizer`` set, the checkpoint must carry optimizer
    state (a training checkpoint, not an exported final model).
    """
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a checkpoint (no metadata.json / {MODEL_CONFIG}); "
            "point to a directory written by training"
        )
    verify_checkpoint(path)
    install_safe_object_loading()
    trainer_state = read_trainer_state(path)
    if optimizer is not None and not trainer_state.get("has_optimizer_state", False):
        raise CheckpointError(
            f"{path} holds no optimizer state (an exported model); start a new run from it "
            "with pretrained_checkpoint.restore_from_path instead of resuming"
        )
    # RNG streams are per rank: they carry over only to the same parallel layout.
    same_layout = trainer_state.get("layout_pp_tp_dp") == _layout()
    sharded = {"model": _model_sharded_state_dict(model_chunks)}
    if optimizer is not None:
        with optimizer_calls():
            _prepare_optimizer_for_loading(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], is_loading=True, metadata=OPTIM_SHARDING
            )
        if same_layout:
            sharded["rng_state"] = _rng_sharded_object()
    with cuda_on_cpu(), load_errors(path):
        # Unexpected keys are fine: a model-only load ignores the optimizer state.
        state = dist_checkpointing.load(sharded, str(path), strict="assume_ok_unexpected")
    _load_model_state(_unwrap(model_chunks[0]), state["model"], strict)
    if optimizer is not None:
        with optimizer_calls():
            optimizer.load_state_dict(state["optimizer"])
        _unshare_step_counters(optimizer)
        # The saved param groups carry torch Adam's fused/foreach choice, a speed setting,
        # not state: a checkpoint from before the fused CPU Adam would restore the slow loop.
        fuse_torch_adam(optimizer)
        if same_layout:
            _restore_rng(state["rng_state"])
    return trainer_state


def load_extra(path, name: str, sharded: dict) -> dict:
    """The ``name`` entry a run stored with ``save_checkpoint(extra={name: ...})``, loaded into
    the shape of ``sharded`` (at any TP/PP layout); ``CheckpointError`` when it is absent."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with cuda_on_cpu(), load_errors(path):
        stored = load_tensors_metadata(str(path))
        wanted = [t.key for t in sharded.values() if isinstance(t, ShardedTensor)]
        if wanted and wanted[0] not in stored:
            raise CheckpointError(f"{path} holds no {name} (it was not written by a run that keeps one); "
                                  "resume from a checkpoint of the same kind of run")
        return dist_checkpointing.load({name: sharded}, str(path), strict="assume_ok_unexpected")[name]


@contextlib.contextmanager
def load_errors(path):
    """Reading ``path`` fails in one line: an object in its shards that is not plain data, or a
    shard torch's reader cannot read (its ``CheckpointException`` is a ``BaseException``)."""
    try:
        yield
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} stores an object that is not plain data; refusing to unpickle it (it could run code). "
            "Use checkpoints from a source you trust"
        ) from None
    except CheckpointException as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} could not be read ({reason[:200]}); the checkpoint is damaged") from None


def has_optimizer_state(path) -> bool:
    """True for a training checkpoint, False for an exported final model."""
    return bool(read_trainer_state(path).get("has_optimizer_state", False))


def read_trainer_state(path) -> dict:
    f = Path(path) / TRAINER_STATE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is damaged ({e}); the checkpoint cannot be read") from None


def read_model_config(path) -> dict:
    f = Path(path) / MODEL_CONFIG
    try:
        return OmegaConf.to_container(OmegaConf.load(f), resolve=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing; {path} is not a whole checkpoint") from None
    except Exception as e:  # noqa: BLE001 -- YAML and interpolation errors alike
        raise CheckpointError(f"{f} is damaged ({type(e).__name__}); the checkpoint cannot be read") from None


def checkpoint_name(step: int, metric_name: str | None = None, metric=None) -> str:
    name = f"step={step:07d}"
    if metric_name and metric is not None:
        name += f"-{metric_name.replace('/', '_')}={metric:.4f}"
    return name


_STEP_RE = re.compile(r"step=(\d+)")
_TMP_RE = re.compile(r"\.tmp-(\d+)$")


def _step_of(path) -> int:
    """A checkpoint's step (from trainer_state.json, else its name; -1 when neither says)."""
    try:
        return int(read_trainer_state(path).get("step", -1))
    except (CheckpointError, ValueError, OSError):
        match = _STEP_RE.search(Path(path).name)
        return int(match.group(1)) if match else -1


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointManager:
    """Keeps the ``save_top_k`` best checkpoints by a monitored metric, plus the latest.

    ``mode`` is ``min`` or ``max``. Checkpoints without the metric rank last. The most
    recent checkpoint is never deleted, so resuming always has a starting point.
    """

    def __init__(self, directory, save_top_k: int = 1, monitor: str | None = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"checkpoint mode={mode!r}; choose min or max")
        self.directory = Path(directory)
        self.save_top_k = int(save_top_k)
        self.monitor = monitor
        self.mode = mode

    def checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if is_checkpoint(p) and ".tmp-" not in p.name]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def latest_intact(self) -> Path | None:
        """The newest checkpoint that :func:`verify_checkpoint` accepts; each newer damaged one
        is reported in one line and left in place."""
        from nemo_aligner.utils.logging import get_logger

        damaged = []
        for path in reversed(self.checkpoints()):
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                damaged.append(str(e))
                continue
            for reason in damaged:
                get_logger().warning(f"resuming from {path.name}, not a newer damaged checkpoint: {reason}")
            return path
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.directory} to resume from: {damaged[0]}; "
                                  "start a new run in another exp_manager.explicit_log_dir")
        return None

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove ``<name>.tmp-<pid>`` directories left by saves whose process is gone (rank 0)."""
        removed = []
        if not self.directory.is_dir() or not is_global_rank_zero():
            return removed
        for p in self.directory.iterdir():
            match = _TMP_RE.search(p.name)
            if p.is_dir() and match and not _process_alive(int(match.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def save(self, model_chunks, model_cfg, optimizer, trainer_state: dict, tokenizer_dir=None, extra=None) -> Path:
        metric = (trainer_state.get("metrics") or {}).get(self.monitor) if self.monitor else None
        name = checkpoint_name(trainer_state["step"], self.monitor, metric)
        path = save_checkpoint(
            self.directory / name, model_chunks, model_cfg, optimizer, trainer_state, tokenizer_dir, extra=extra
        )
        if is_global_rank_zero():
            self._prune(keep=path)
        barrier()
        return path

    def _score(self, path):
        try:
            value = (read_trainer_state(path).get("metrics") or {}).get(self.monitor)
        except CheckpointError:
            value = None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return float("inf")  # missing or NaN ranks last, never best
        return value if self.mode == "min" else -value

    def _prune(self, keep: Path) -> None:
        if self.save_top_k < 0:
            return
        ckpts = self.checkpoints()
        best = sorted(ckpts, key=self._score)[: self.save_top_k]
        for p in ckpts:
            if p != keep and p not in best:
                shutil.rmtree(p, ignore_errors=True)
