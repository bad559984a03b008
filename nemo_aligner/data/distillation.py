"""Top-k teacher logits files for knowledge distillation.

``examples/nlp/synthetic_data_gen/compute_topk_logits.py`` writes ``OUT.jsonl``, one line per
SFT sample::

    {"index": i, "tokens": [...], "labels": [...], "loss_mask": [...],
     "topk_logits": [[K floats, descending] per position], "topk_token_ids": [[K ids] per position],
     "log_sum_exp_logits": [one float per position]}

(position ``t`` holds the teacher's prediction of ``labels[t]``), and ``OUT.jsonl.meta.json``
with ``top_k``, the teacher's tokenizer fingerprint (``vocab_size`` and the ids of a probe
text) and the teacher's path. A student refuses a file whose ``k`` or tokenizer differs from
its own, in one line.
"""

import json
from pathlib import Path

import torch

from nemo_aligner.data.datasets import read_jsonl, sft_collate
from nemo_aligner.data.errors import DataError
from nemo_aligner.data.tokenizers import tokenizer_fingerprint

SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask")
TOPK_FIELDS = ("topk_logits", "topk_token_ids")


def meta_path(path) -> Path:
    return Path(f"{path}.meta.json")


def read_meta(path) -> dict:
    meta = meta_path(path)
    if not meta.is_file():
        raise DataError(f"{path}: no {meta.name} beside it; write the file with "
                        "examples/nlp/synthetic_data_gen/compute_topk_logits.py")
    return json.loads(meta.read_text())


def check_meta(path, meta: dict, top_k: int | None, tokenizer) -> int:
    """The file's ``k``, after checking it and the tokenizer against the student's."""
    k = int(meta["top_k"])
    if top_k is not None and int(top_k) != k:
        raise DataError(f"{path}: holds the teacher's top {k} logits but model.knowledge_distillation.top_k={top_k}; "
                        f"set top_k={k} or recompute the file with top_k={top_k}")
    vocab, probe = tokenizer_fingerprint(tokenizer)
    if [meta["vocab_size"], meta["probe_ids"]] != [vocab, probe]:
        raise DataError(f"{path}: written with a teacher tokenizer of {meta['vocab_size']} ids that tokenizes "
                        f"differently from the student's ({vocab} ids); distillation needs the same tokenizer")
    return k


class TopKDataset:
    """The samples of a top-k logits file, as SFT samples plus ``topk_logits`` ``[T, K]`` (float32)
    and ``topk_token_ids`` ``[T, K]`` (int64); every line is checked when loaded."""

    def __init__(self, path, tokenizer, top_k: int | None, max_seq_length: int):
        self.path = str(path)
        self.k = check_meta(path, read_meta(path), top_k, tokenizer)
        vocab = int(tokenizer.vocab_size)
        self.samples = []
        for line_no, row in read_jsonl(path):
            where = f"{path}:{line_no}"
            for field in (*SEQUENCE_FIELDS, *TOPK_FIELDS):
                if not isinstance(row.get(field), list) or not row[field]:
                    raise DataError(f"{where}: missing or empty field {field!r}; recompute the file")
            n = len(row["tokens"])
            if any(len(row[f]) != n for f in (*SEQUENCE_FIELDS, *TOPK_FIELDS)):
                raise DataError(f"{where}: fields {SEQUENCE_FIELDS + TOPK_FIELDS} differ in length; recompute the file")
            if n > max_seq_length:
                raise DataError(f"{where}: {n} tokens, longer than model.encoder_seq_length={max_seq_length}")
            logits = torch.tensor(row["topk_logits"], dtype=torch.float32)
            ids = torch.tensor(row["topk_token_ids"], dtype=torch.long)
            if logits.shape != (n, self.k) or ids.shape != (n, self.k):
                raise DataError(f"{where}: field 'topk_logits' / 'topk_token_ids' is not [{n}, {self.k}] "
                                f"(k={self.k} in {meta_path(path).name})")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise DataError(f"{where}: field 'topk_token_ids' has ids outside the vocabulary (0..{vocab - 1})")
            self.samples.append({
                "tokens": torch.tensor(row["tokens"]), "labels": torch.tensor(row["labels"]),
                "loss_mask": torch.tensor(row["loss_mask"]), "position_ids": torch.arange(n),
                "topk_logits": logits, "topk_token_ids": ids,
            })

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def topk_collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int = 1, pad_to: int | None = None) -> dict:
    """:func:`~nemo_aligner.data.datasets.sft_collate` plus the ``[b, s, K]`` top-k tensors
    (padding positions: logits 0, ids 0; their loss mask is 0)."""
    batch = sft_collate([{k: s[k] for k in (*SEQUENCE_FIELDS, "position_ids")} for s in samples], pad_id,
                        pad_to_multiple_of=pad_to_multiple_of, pad_to=pad_to)
    b, seq = batch["tokens"].shape
    k = samples[0]["topk_logits"].shape[-1]
    for field, dtype in (("topk_logits", torch.float32), ("topk_token_ids", torch.long)):
        out = torch.zeros((b, seq, k), dtype=dtype)
        for row, s in enumerate(samples):
            out[row, : len(s[field])] = s[field]
        batch[field] = out
    return batch
