"""Hugging Face checkpoints in and out: Llama (incl. Llama 3 RoPE scaling, GQA), Mistral,
Qwen2 and GPT-2, at any tensor/pipeline-parallel layout.

- :func:`import_hf_model` ``(hf_dir) -> (model, model_cfg)``: this rank's part of a
  Megatron-Core ``GPTModel`` with the checkpoint's weights. Each rank reads only its own
  shard of each tensor (safetensors slices), one tensor at a time, straight into the model's
  parameters, so the import holds at most one tensor beyond the model.
- :func:`load_hf_weights` ``(model, hf_dir)``: the same into a model built elsewhere (how
  training entry points start from a Hugging Face directory).
- :func:`export_hf_model` ``(model, model_cfg, out_dir)`` (collective): gathers every
  tensor on global rank 0, one at a time, and writes ``config.json`` plus safetensors
  (sharded with ``model.safetensors.index.json`` above ``max_shard_size``), and the tokenizer
  files when given, so that ``transformers`` loads the directory directly.

Nothing here needs ``transformers``: configs are JSON and weights are safetensors (or
``pytorch_model.bin`` read with ``torch.load(weights_only=True)``). How each architecture
maps onto Megatron's parameters is in :mod:`nemo_aligner.checkpoint.hf_arch`.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nemo_aligner.checkpoint import hf_arch
from nemo_aligner.checkpoint.output import EXPORT_MARKER, check_output_dir, is_our_export, replace_dir
from nemo_aligner.checkpoint.hf_arch import COLUMN, GLU, QKV, REPLICATED, ROW, VOCAB, ZERO, Source
from nemo_aligner.data.tokenizers import copy_tokenizer_files
from nemo_aligner.utils import distributed

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


class HFCheckpointError(ValueError):
    """A Hugging Face directory that is missing files or does not match its config."""


def is_hf_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_hf_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{hf_dir} has no config.json; point to a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None


def model_cfg_from_hf_dir(hf_dir) -> dict:
    """``model.*`` architecture keys for a Hugging Face directory, plus ``hf_config`` (its
    ``config.json``, kept so an export writes back everything the import did not use)."""
    hf = read_hf_config(hf_dir)
    cfg = hf_arch.model_cfg_from_hf(hf)
    cfg["hf_config"] = hf
    return cfg


class HFWeights:
    """Read-only access to the tensors of a Hugging Face checkpoint, by slices.

    Safetensors files are opened per read, so only the requested slice is ever resident.
    """

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        self._files: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] = {}
        if (self.dir / SAFE_INDEX).is_file():
            index = json.loads((self.dir / SAFE_INDEX).read_text())
            self._files = {k: self.dir / v for k, v in index["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self._files = {k: self.dir / "model.safetensors" for k in f.keys()}
        elif (self.dir / "pytorch_model.bin").is_file() or (self.dir / BIN_INDEX).is_file():
            self._load_bin()
        else:
            raise HFCheckpointError(
                f"{self.dir} holds no weights (model.safetensors, {SAFE_INDEX} or pytorch_model.bin)"
            )
        missing = [str(p) for p in set(self._files.values()) if not p.is_file()]
        if missing:
            raise HFCheckpointError(f"{self.dir}: weight files named in the index are missing: {missing}")

    def _load_bin(self) -> None:
        files = ["pytorch_model.bin"]
        if (self.dir / BIN_INDEX).is_file():
            files = sorted(set(json.loads((self.dir / BIN_INDEX).read_text())["weight_map"].values()))
        for name in files:
            # mmap: tensors stay on disk until sliced; weights_only: never unpickle code.
            self._bin.update(torch.load(self.dir / name, map_location="cpu", weights_only=True, mmap=True))

    def names(self) -> set[str]:
        return set(self._files) | set(self._bin)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._bin:
            return tuple(self._bin[name].shape)
        with safe_open(self._file(name), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def _file(self, name: str) -> Path:
        if name not in self._files:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        return self._files[name]

    def _raw(self, name: str, index: tuple) -> torch.Tensor:
        if name in self._bin:
            return self._bin[name][index].clone()
        with safe_open(self._file(name), framework="pt") as f:
            return f.get_slice(name)[index]

    def read(self, src: Source, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Rows/columns of ``src`` seen as an ``[out, in]`` (or ``[n]``) tensor."""
        start = src.offset + (rows.start if rows is not None else 0)
        if rows is not None:
            stop = src.offset + rows.stop
        elif src.rows is not None:
            stop = src.offset + src.rows
        else:
            stop = None
        row_slice = slice(start, stop)
        if src.transpose:
            col_slice = cols if cols is not None else slice(None)
            return self._raw(src.name, (col_slice, row_slice)).t().contiguous()
        if cols is None:
            return self._raw(src.name, (row_slice,))
        return self._raw(src.name, (row_slice, cols))


# ---------------------------------------------------------------------------------- import
def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _global_names(model) -> dict[str, str]:
    """``{local parameter name: name with global layer numbers}`` (PP stages number their
    layers from 0 locally; ``layer_number`` is global and 1-based)."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    out = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.match(name)
        out[name] = f"decoder.layers.{offsets[int(m.group(1))]}.{name[m.end():]}" if m else name
    return out


def _qkv_dims(model_cfg) -> tuple[int, int, int]:
    heads = int(model_cfg["num_attention_heads"])
    groups = int(model_cfg.get("num_query_groups") or heads)
    head_dim = int(model_cfg.get("kv_channels") or int(model_cfg["hidden_size"]) // heads)
    return groups, heads // groups, head_dim


def _check_shape(piece: torch.Tensor, target: torch.Tensor, src: Source, name: str) -> None:
    if tuple(piece.shape) != tuple(target.shape):
        raise HFCheckpointError(
            f"{src.name}: shape {tuple(piece.shape)} does not fit {name} "
            f"{tuple(target.shape)}; is config.json the one these weights were saved with?"
        )


def _load_shard(reader: HFWeights, spec, param: torch.Tensor, name: str, model_cfg, tp_rank: int, tp: int) -> None:
    """Read this rank's shard of one Megatron parameter into ``param``.

    Each Hugging Face slice is copied into its place in ``param`` (a view) as soon as it is
    read, so at most one slice exists beside the model at any time.
    """
    kind, src = spec.kind, spec.sources

    def put(target, piece, source):
        _check_shape(piece, target, source, name)
        target.copy_(piece)

    if kind == ZERO:
        param.zero_()
    elif kind == REPLICATED:
        put(param, reader.read(src[0]), src[0])
    elif kind == COLUMN:
        n = param.shape[0]
        put(param, reader.read(src[0], rows=slice(tp_rank * n, (tp_rank + 1) * n)), src[0])
    elif kind == ROW:
        n = param.shape[1]
        put(param, reader.read(src[0], cols=slice(tp_rank * n, (tp_rank + 1) * n)), src[0])
    elif kind == VOCAB:
        n = param.shape[0]
        real = reader.shape(src[0].name)[0]
        lo, hi = tp_rank * n, min((tp_rank + 1) * n, real)
        if hi > lo:
            put(param[: hi - lo], reader.read(src[0], rows=slice(lo, hi)), src[0])
        param[max(hi - lo, 0):].zero_()  # padding rows (masked out of the logits by the model)
    elif kind == GLU:
        n = param.shape[0] // 2
        rows = slice(tp_rank * n, (tp_rank + 1) * n)
        put(param[:n], reader.read(src[0], rows=rows), src[0])
        put(param[n:], reader.read(src[1], rows=rows), src[1])
    elif kind == QKV:
        groups, per_group, head_dim = _qkv_dims(model_cfg)
        local = groups // tp
        if param.shape[0] != local * (per_group + 2) * head_dim:
            raise HFCheckpointError(
                f"{name} {tuple(param.shape)} does not hold {local} query groups of "
                f"{per_group} heads x {head_dim}; is config.json the one these weights were saved with?"
            )
        g0 = tp_rank * local
        view = param.view(local, (per_group + 2) * head_dim, *param.shape[1:])
        blocks = ((0, per_group), (per_group, 1), (per_group + 1, 1))  # (first row block, blocks) of q, k, v
        for source, (first, count) in zip(src, blocks):
            rows = count * head_dim
            piece = reader.read(source, rows=slice(g0 * rows, (g0 + local) * rows))
            target = view[:, first * head_dim : (first + count) * head_dim]
            _check_shape(piece, target.reshape(local * rows, *param.shape[1:]), source, name)
            target.copy_(piece.view(local, rows, *piece.shape[1:]))
    else:
        raise AssertionError(f"unknown parameter kind {kind}")


@torch.no_grad()
def load_hf_weights(model, hf_dir, model_cfg: dict | None = None, progress: bool = False) -> None:
    """Copy a Hugging Face checkpoint into ``model`` (this rank's chunk, any TP/PP layout).

    Every parameter of the model must come from the checkpoint; shapes are checked, and a
    mismatch names the tensor and both shapes.
    """
    model = _unwrap(model)
    if model_cfg is None:
        model_cfg = model_cfg_from_hf_dir(hf_dir)
    hf = model_cfg.get("hf_config") or read_hf_config(hf_dir)
    reader = HFWeights(hf_dir)
    wmap = hf_arch.weight_map(hf["model_type"], model_cfg, reader.names())
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    names = _global_names(model)
    params = dict(model.named_parameters())
    bar = tqdm(params.items(), desc=f"loading {Path(hf_dir).name}", unit="tensor",
               disable=not (progress and distributed.is_global_rank_zero()))
    for name, param in bar:
        spec = wmap.get(names[name])
        if spec is None:
            raise HFCheckpointError(f"no Hugging Face tensor maps to parameter {names[name]}")
        _load_shard(reader, spec, param.data, names[name], model_cfg, tp_rank, tp)


def import_hf_model(hf_dir, precision: str | None = None, encoder_seq_length: int | None = None,
                    progress: bool = False):
    """``(model, model_cfg)``: this rank's GPT chunk with the weights of ``hf_dir``.

    The parallel layout is the current one (``distributed.initialize`` is called for a world
    of one when nothing is initialized). ``precision`` (``32``, ``bf16``, ``16``) defaults to
    float32. ``model(input_ids, position_ids, attention_mask=None)`` returns logits
    ``[batch, seq, vocab_padded / tp]``; padded vocabulary ids get a very negative logit.
    """
    from nemo_aligner.models.gpt import build_gpt_model

    if not distributed.is_initialized():
        distributed.initialize()
    model_cfg = model_cfg_from_hf_dir(hf_dir)
    max_len = int(model_cfg["max_position_embeddings"])
    model_cfg.update(
        precision=str(precision or "32"),
        encoder_seq_length=int(encoder_seq_length or min(max_len, model_cfg.get("sliding_window") or max_len)),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    distributed.validate_parallel_layout(
        torch.distributed.get_world_size(), model_cfg["tensor_model_parallel_size"],
        model_cfg["pipeline_model_parallel_size"], model_cfg["num_layers"],
    )
    model = build_gpt_model(model_cfg, model_cfg["vocab_size"], initialize=False)
    load_hf_weights(model, hf_dir, model_cfg, progress=progress)
    return model, model_cfg


# ---------------------------------------------------------------------------------- export
def _merge(kind: str, shards: list[torch.Tensor], model_cfg) -> torch.Tensor:
    """The full Megatron tensor from its tensor-parallel shards (in TP-rank order)."""
    if kind in (REPLICATED, ZERO):
        return shards[0]
    if kind in (COLUMN, QKV):
        return torch.cat(shards, dim=0)
    if kind == VOCAB:
        return torch.cat(shards, dim=0)[: int(model_cfg["vocab_size"])]
    if kind == ROW:
        return torch.cat(shards, dim=1)
    if kind == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise AssertionError(kind)


def _split_sources(kind: str, full: torch.Tensor, model_cfg) -> list[torch.Tensor]:
    """The tensors of ``spec.sources`` (logical ``[out, in]`` form) from a merged tensor."""
    if kind == QKV:
        groups, per_group, head_dim = _qkv_dims(model_cfg)
        rest = full.shape[1:]
        g = full.reshape(groups, (per_group + 2) * head_dim, *rest)
        q = g[:, : per_group * head_dim].reshape(-1, *rest)
        k = g[:, per_group * head_dim : (per_group + 1) * head_dim].reshape(-1, *rest)
        v = g[:, (per_group + 1) * head_dim :].reshape(-1, *rest)
        return [q, k, v]
    if kind == GLU:
        return list(full.chunk(2, dim=0))
    if kind == ZERO:
        return []
    return [full]


class _ShardWriter:
    """Collects tensors and writes safetensors files of at most ``max_bytes`` each."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        n = len(self.files)
        for i, (tmp_name, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp_name, self.directory / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _holders_table(model, wmap):
    """Every rank's ``(rank, tp_rank, {global name: (shape, dtype)})`` for data-parallel rank 0."""
    params = dict(model.named_parameters())
    held = {}
    if parallel_state.get_data_parallel_rank() == 0:
        for local, name in _global_names(model).items():
            if name in wmap:
                p = params[local]
                held[name] = (tuple(p.shape), str(p.dtype).replace("torch.", ""))
    mine = (dist.get_rank(), parallel_state.get_tensor_model_parallel_rank(), held)
    return distributed.all_gather_objects(mine)


def _gather_full(name, kind, table, local_params, model_cfg):
    """On rank 0, the merged tensor ``name`` (None elsewhere); point-to-point from holders."""
    holders = sorted((tp_rank, rank, held[name]) for rank, tp_rank, held in table if name in held)
    if kind in (REPLICATED, ZERO):
        holders = holders[:1]
    me = dist.get_rank()
    shards = []
    for _, rank, (shape, dtype) in holders:
        if rank == me:
            tensor = local_params[name].detach()
            if me == 0:
                shards.append(tensor.clone())
            else:
                dist.send(tensor.contiguous(), dst=0)
        elif me == 0:
            buf = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.recv(buf, src=rank)
            shards.append(buf)
    return _merge(kind, shards, model_cfg) if me == 0 else None


@torch.no_grad()
def export_hf_model(model, model_cfg: dict, out_dir, dtype: str | None = None,
                    tokenizer_dir=None, max_shard_size: int = 2 * 1024**3, progress: bool = False,
                    overwrite: bool = False) -> Path:
    """Write ``model`` (any TP/PP layout; collective over every rank) as a Hugging Face
    directory ``out_dir``: ``config.json``, safetensors weights, and the tokenizer files
    found in ``tokenizer_dir`` (a directory or a ``tokenizer.json``).

    ``dtype`` (``float32``, ``bfloat16``, ``float16``) defaults to the dtype of the Hugging
    Face checkpoint the model was imported from, else the model's own. The directory is
    written next to ``out_dir`` and renamed into place when complete; an existing ``out_dir`` is
    replaced only when it is an earlier export of ours (or ``overwrite``), see
    :mod:`nemo_aligner.checkpoint.output`.
    """
    check_output_dir(out_dir, is_our_export, overwrite)
    model = _unwrap(model)
    model_cfg = _resolved_cfg(model, model_cfg)
    model_type = hf_arch.infer_model_type(model_cfg)
    if dtype is None:
        hf_prec = hf_arch.precision_from_hf(model_cfg.get("hf_config") or {})
        dtype = hf_arch.hf_dtype_name(hf_prec or model_cfg.get("precision", "32"))
    torch_dtype = getattr(torch, dtype)
    # Everything that can refuse the export does so on every rank, before anything is written.
    config = hf_arch.hf_config_from_model_cfg(model_cfg, model_type, dtype, _special_token_ids(tokenizer_dir))
    wmap = hf_arch.weight_map(model_type, model_cfg)
    _check_zero_params(model, wmap)
    tied = bool(model_cfg.get("share_embeddings_and_output_weights", False))
    table = _holders_table(model, wmap)
    present = set().union(*(held for _, _, held in table))
    order = [n for n in wmap if n in present and not (tied and n == "output_layer.weight")]
    params = dict(model.named_parameters())
    local_params = {g: params[l] for l, g in _global_names(model).items()}

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{distributed.broadcast_object(os.getpid())}")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_size) if rank0 else None
    for name in tqdm(order, desc=f"exporting {out_dir.name}", unit="tensor", disable=not (progress and rank0)):
        spec = wmap[name]
        full = _gather_full(name, spec.kind, table, local_params, model_cfg)
        if rank0:
            for hf_name, tensor in _hf_tensors(spec, full, model_cfg):
                writer.add(hf_name, tensor.to(torch_dtype))
    if rank0:
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        (tmp / EXPORT_MARKER).write_text("written by nemo_aligner.checkpoint.hf.export_hf_model\n")
        replace_dir(tmp, out_dir)
    distributed.barrier()
    return out_dir


def _resolved_cfg(model, model_cfg: dict) -> dict:
    """``model_cfg`` with the sizes the model was actually built with (defaults resolved)."""
    c = model.config
    return dict(
        model_cfg, num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_query_groups,
        kv_channels=c.kv_channels, layernorm_epsilon=c.layernorm_epsilon,
        max_position_embeddings=model.max_sequence_length,
    )


def _check_zero_params(model, wmap) -> None:
    """Refuse (on every rank) to drop a parameter Hugging Face has no place for unless it is
    zero: e.g. a regression reward head's bias, which sequence classifiers lack."""
    params = dict(model.named_parameters())
    nonzero = [g for l, g in _global_names(model).items()
               if g in wmap and wmap[g].kind == ZERO and bool(params[l].detach().abs().max() > 0)]
    flag = torch.tensor([1.0 if nonzero else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise hf_arch.UnsupportedArchitecture(
            f"{nonzero[0] if nonzero else 'a parameter'} is nonzero but has no Hugging Face counterpart "
            "(sequence classifiers have no score bias); this reward model cannot be exported exactly"
        )


def _hf_tensors(spec, full: torch.Tensor, model_cfg):
    """``[(Hugging Face name, tensor)]`` made from the merged Megatron tensor ``full``.

    Sources naming the same tensor are row blocks of it (GPT-2's fused Q, K, V), joined in
    offset order; Conv1D sources are written transposed back to ``[in, out]``.
    """
    blocks: dict[str, list] = {}
    for src, tensor in zip(spec.sources, _split_sources(spec.kind, full, model_cfg)):
        blocks.setdefault(src.name, []).append((src, tensor))
    out = []
    for name, parts in blocks.items():
        parts.sort(key=lambda part: part[0].offset)
        tensor = torch.cat([t for _, t in parts], dim=0) if len(parts) > 1 else parts[0][1]
        out.append((name, tensor.t() if parts[0][0].transpose else tensor))
    return out


def _special_token_ids(tokenizer_dir) -> dict:
    if tokenizer_dir is None:
        return {}
    from nemo_aligner.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok._pad_id}
