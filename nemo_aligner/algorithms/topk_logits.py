"""A teacher's top-k logits over SFT data, written for distillation (see
:mod:`nemo_aligner.data.distillation` for the file format).

Resumable and crash-safe: lines are appended a batch at a time (flushed and fsynced); a rerun
drops a partial last line, skips the indices already written and continues. The ``.meta.json``
beside the file is written atomically first, and a rerun with another ``k`` or tokenizer is
refused instead of mixing two teachers' outputs in one file.
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.data.datasets import completed_jsonl_lines
from nemo_aligner.data.distillation import meta_path
from nemo_aligner.data.tokenizers import tokenizer_fingerprint


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int):
    """``(values, global ids)`` of the ``k`` largest logits, descending, and ``logsumexp`` over the
    whole vocabulary, from this rank's vocabulary shard ``[..., V/tp]`` (exchanges ``tp * k``
    candidates per position, never the full vocabulary)."""
    width = logits.shape[-1]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    logits = logits.float()
    if k > width:
        raise ValueError(f"top_k={k} exceeds this rank's {width} vocabulary entries; lower top_k")
    values, ids = logits.topk(k, dim=-1)
    ids = ids + parallel_state.get_tensor_model_parallel_rank() * width
    peak = logits.max(dim=-1).values
    if tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        all_values = [torch.empty_like(values) for _ in range(tp)]
        all_ids = [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        values, pick = torch.cat(all_values, -1).topk(k, dim=-1)
        ids = torch.cat(all_ids, -1).gather(-1, pick)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (logits - peak.unsqueeze(-1)).exp().sum(-1)
    if tp > 1:
        dist.all_reduce(sum_exp, group=parallel_state.get_tensor_model_parallel_group())
    return values, ids, peak + sum_exp.log()


def _write_meta(path: Path, k: int, tokenizer, teacher: str) -> None:
    vocab, probe = tokenizer_fingerprint(tokenizer)
    meta = {"top_k": k, "vocab_size": vocab, "probe_ids": probe, "teacher": teacher}
    target = meta_path(path)
    if target.exists():
        old = json.loads(target.read_text())
        if [old.get("top_k"), old.get("vocab_size"), old.get("probe_ids")] != [k, vocab, probe]:
            raise ValueError(f"{path} holds the top {old.get('top_k')} logits of a teacher with another "
                             f"tokenizer or k (this run: top_k={k}); write to a new output_path")
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, target)


def write_topk_logits(model, dataset, collate, out_path, k: int, tokenizer, teacher: str, micro_batch_size: int,
                      start: int = 0, end: int | None = None, progress: bool = True) -> int:
    """Run ``model`` (this rank's teacher, TP only) over ``dataset[start:end]`` and append the
    top-``k`` logits of every sample not yet in ``out_path``; returns how many were written.
    Collective over the tensor- and data-parallel groups; global rank 0 writes."""
    from tqdm import tqdm

    from nemo_aligner.models.forward import forward_batch
    from nemo_aligner.utils.distributed import all_gather_objects, broadcast_object, is_global_rank_zero

    out_path = Path(out_path)
    end = len(dataset) if end is None else min(int(end), len(dataset))
    done = None
    if is_global_rank_zero():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_meta(out_path, k, tokenizer, teacher)
        done = {row["index"] for row in completed_jsonl_lines(out_path)}
    done = broadcast_object(done)
    todo = [i for i in range(int(start), end) if i not in done]
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    step = micro_batch_size * dp_size
    written = 0
    model.eval()
    for first in tqdm(range(0, len(todo), step), desc="top-k logits", disable=not (progress and is_global_rank_zero())):
        mine = todo[first : first + step][dp_rank * micro_batch_size : (dp_rank + 1) * micro_batch_size]
        rows = []
        if mine:
            samples = [dataset[i] for i in mine]
            batch = collate(samples)
            values, ids, lse = vocab_parallel_topk(forward_batch(model, batch), k)
            for row, (index, sample) in enumerate(zip(mine, samples)):
                n = len(sample["tokens"])
                rows.append({
                    "index": index, "tokens": sample["tokens"].tolist(), "labels": sample["labels"].tolist(),
                    "loss_mask": sample["loss_mask"].tolist(), "topk_logits": values[row, :n].tolist(),
                    "topk_token_ids": ids[row, :n].tolist(), "log_sum_exp_logits": lse[row, :n].tolist(),
                })
        gathered = all_gather_objects(rows if parallel_state.get_tensor_model_parallel_rank() == 0 else [])
        if is_global_rank_zero():
            lines = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            with open(out_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in lines))
                f.flush()
                os.fsync(f.fileno())
            written += len(lines)
    return broadcast_object(written)
