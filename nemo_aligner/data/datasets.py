"""JSONL datasets with eager validation, and the SFT collate function.

Every dataset reads its whole file in the constructor and raises :class:`DataError`
(``"{path}:{line_no}: {what is wrong}; {how to fix}"``) on the first bad line, so a run
fails before it writes anything.
"""

import json
import os
from pathlib import Path

import torch

from nemo_aligner.data.errors import DataError
from nemo_aligner.data.templates import DEFAULT_PROMPT_TEMPLATE, check_prompt_template, render_chat_segments, render_prompt
from nemo_aligner.data.tokenizers import Tokenizer

__all__ = ["DataError", "read_jsonl", "read_data_files", "data_files", "data_prefix", "write_jsonl", "SFTDataset",
           "sft_collate", "make_padding_sample"]

TRUNCATION_POLICIES = ("error", "truncate", "drop")
_SFT_FIELDS_HINT = "SFT lines need 'input' and 'output', or 'conversations'"


def completed_jsonl_lines(path) -> list[dict]:
    """The complete lines of an append-only JSONL output that a crash may have torn (a run
    resuming ``path``): a partial last line is cut off the file first; missing file: ``[]``."""
    import os

    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """``[(line_no, object), ...]`` for every non-blank line of ``path`` (line numbers 1-based).

    Raises ``FileNotFoundError`` for a missing file and :class:`DataError` for a line that is
    not UTF-8, not JSON, or not a JSON object, and for a file without any sample.
    """
    path = str(path)
    samples = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: data file not found; check the path in model.data.data_prefix") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not valid UTF-8; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}; each line must be one JSON object")
            samples.append((line_no, obj))
    if not samples:
        raise DataError(f"{path}:1: file has no samples (it is empty or blank); point the data path at a JSONL file with one JSON object per line")
    return samples


def data_files(value, key: str = "model.data.data_prefix") -> list[str]:
    """The file(s) of a data path setting: one path, or NeMo-Aligner's list of paths (read in
    order); anything else is a ``ValueError`` naming ``key``."""
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"{key}={value!r}; give a JSONL path or a list of JSONL paths")


def display_path(value) -> str:
    """How a path setting is named in messages (a list of files joined by commas)."""
    return ", ".join(data_files(value)) if isinstance(value, (list, tuple)) else str(value)


def read_data_files(value, key: str = "model.data.data_prefix") -> list[tuple[str, dict]]:
    """``[("file:line", object), ...]`` of every file of ``value`` (see :func:`data_files`), in
    order; each error names its own file and line (see :func:`read_jsonl`)."""
    out = []
    for path in data_files(value, key):
        out.extend((f"{path}:{line_no}", obj) for line_no, obj in read_jsonl(path))
    return out


def data_prefix(cfg) -> dict:
    """``model.data.data_prefix`` as ``{"train", "validation", "test"}`` (values: a path, a list
    of paths, or None); a value of another shape is a one-line error."""
    from nemo_aligner.utils.config import cfg_get

    prefix = cfg_get(cfg, "model.data.data_prefix", None)
    if prefix is None:
        return {}
    if not isinstance(prefix, dict):
        raise ValueError(
            f"model.data.data_prefix={prefix!r}; it takes the splits: model.data.data_prefix.train=FILE "
            "(and .validation), or model.data.data_prefix='{train: FILE, validation: FILE}'"
        )
    for split, value in prefix.items():
        if value is not None:
            data_files(value, f"model.data.data_prefix.{split}")
    return prefix


def check_tokenization_options(tokenizer: Tokenizer, truncation: str, add_bos: bool, add_eos: bool) -> None:
    """Raise ``ValueError`` naming the fix for a truncation policy or BOS/EOS setting that
    cannot work with ``tokenizer``."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r}; use one of {TRUNCATION_POLICIES}")
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token; set add_bos=False")
    if add_eos and tokenizer.eos_id is None:
        raise ValueError("add_eos=True but the tokenizer has no EOS token; set add_eos=False")


def write_jsonl(path, records) -> None:
    """Write ``records`` (dicts) to ``path``, one JSON object a line, atomically: a reader
    sees the old file or the whole new one, never a partial one. Creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def is_chat_sample(sample: dict) -> bool:
    return "conversations" in sample or "messages" in sample


def uses_nemo_template(sample: dict, chat_prompt_tokens=None) -> bool:
    """Whether a line is rendered as SteerLM data: a conversation when
    ``model.data.chat_prompt_tokens`` is set (NeMo's special-token template), or one in SteerLM's
    format (NeMo's template, or the tokenizer's chat template where it has one and the tokens
    are not set)."""
    from nemo_aligner.data.steerlm_template import is_steerlm_sample

    return is_chat_sample(sample) and (chat_prompt_tokens is not None or is_steerlm_sample(sample))


def sft_segments(sample: dict, prompt_template: str, chat_template=None, chat_prompt_tokens=None) -> list[tuple[str, bool]]:
    """``[(text, is_loss), ...]`` of one SFT line: SteerLM's rendering (with labels) where
    :func:`uses_nemo_template`, else chat if it has ``conversations`` (or
    ``messages``, rendered with ``chat_template`` when given), else
    ``[(prompt, False), (output, True)]``. Raises ``ValueError``."""
    if uses_nemo_template(sample, chat_prompt_tokens):
        from nemo_aligner.data.steerlm_template import render_segments, render_with_chat_template

        if chat_prompt_tokens is None and chat_template is not None:  # the tokenizer's template wins
            return render_with_chat_template(sample, chat_template)
        return render_segments(sample, chat_prompt_tokens)
    if is_chat_sample(sample):
        return render_chat_segments(sample, chat_template)
    for field in ("input", "output"):
        if field not in sample:
            raise ValueError(f"missing field '{field}' ({_SFT_FIELDS_HINT})")
        if not isinstance(sample[field], str):
            raise ValueError(f"field '{field}' must be a string, got {type(sample[field]).__name__}")
    return [(render_prompt(prompt_template, sample["input"]), False), (sample["output"], True)]


class SFTDataset(torch.utils.data.Dataset):
    """Supervised fine-tuning samples, tokenized at construction.

    A sample is ``[bos]? + prompt + response + [eos]?`` (``ids``, length ``n``) with a
    ``mask`` that is 1 on response tokens (chat: assistant turns) and on the EOS that ends
    a response. ``n`` counts BOS/EOS and must be ``<= max_seq_length``; longer samples
    follow ``truncation``:

    - ``"error"``: raise :class:`DataError` naming the line, the length and the limit;
    - ``"truncate"``: keep the first ``max_seq_length`` tokens (dropped when no trained
      token is left), counted in ``num_truncated``;
    - ``"drop"``: skip the sample, counted in ``num_dropped``.

    ``dataset[i]`` is already shifted for next-token prediction, each a 1-D LongTensor of
    length ``n - 1``: ``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask = mask[1:]``,
    ``position_ids = arange(n - 1)``. ``lengths[i]`` is ``n - 1``.
    """

    def __init__(
        self,
        path: str,
        tokenizer: Tokenizer,
        max_seq_length: int,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        truncation: str = "error",
        add_bos: bool = False,
        add_eos: bool = True,
        chat_prompt_tokens: dict | None = None,
    ):
        check_tokenization_options(tokenizer, truncation, add_bos, add_eos)
        check_prompt_template(prompt_template)
        self.path = display_path(path)
        self.files = data_files(path)
        self.max_seq_length = max_seq_length
        self.truncation = truncation
        self.num_truncated = 0
        self.num_dropped = 0
        self._ids: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        for where, sample in read_data_files(self.files):
            try:
                segments = sft_segments(sample, prompt_template, tokenizer.chat_template, chat_prompt_tokens)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            ids = [tokenizer.bos_id] if add_bos else []
            mask = [0] * len(ids)
            for text, is_loss in segments:
                piece = tokenizer.text_to_ids(text)
                ids += piece
                mask += [int(is_loss)] * len(piece)
            # A Hugging Face chat template closes each turn itself, and NeMo's template ends a reply
            # with a learned turn-start token: EOS would be one too many.
            closed = is_chat_sample(sample) and (tokenizer.chat_template is not None
                                                 or uses_nemo_template(sample, chat_prompt_tokens))
            if add_eos and not closed:
                ids.append(tokenizer.eos_id)
                mask.append(int(segments[-1][1]))
            if not any(mask[1:]):
                raise DataError(f"{where}: nothing to train on (no response token after the first token); give the sample a non-empty response")
            if len(ids) > max_seq_length:
                if truncation == "error":
                    raise DataError(
                        f"{where}: sample has {len(ids)} tokens, more than max_seq_length {max_seq_length}; "
                        "raise max_seq_length or set model.data.truncation=truncate or model.data.truncation=drop"
                    )
                if truncation == "drop" or not any(mask[1:max_seq_length]):
                    self.num_dropped += 1
                    continue
                ids, mask = ids[:max_seq_length], mask[:max_seq_length]
                self.num_truncated += 1
            self._ids.append(torch.tensor(ids, dtype=torch.long))
            self._masks.append(torch.tensor(mask, dtype=torch.long))
        if not self._ids:
            raise DataError(
                f"{self.path}:1: no samples left: all {self.num_dropped} are longer than max_seq_length {max_seq_length}; "
                "raise max_seq_length or set model.data.truncation=truncate"
            )
        self.lengths = [len(ids) - 1 for ids in self._ids]

    def __len__(self) -> int:
        return len(self._ids)

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i`` unshifted: its ``ids`` and ``mask`` (length ``n``)."""
        return self._ids[i], self._masks[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self._ids[i], self._masks[i]
        return {
            "tokens": ids[:-1],
            "labels": ids[1:],
            "loss_mask": mask[1:],
            "position_ids": torch.arange(len(ids) - 1),
        }


def sft_collate(samples: list[dict], pad_id: int, pad_to_multiple_of: int = 1, pad_to: int | None = None) -> dict:
    """Batch samples to ``[b, s]`` tensors, right-padded.

    ``s`` is the longest sample (at least ``pad_to``) rounded up to ``pad_to_multiple_of``.
    Padding: ``tokens``/``labels`` with ``pad_id``, ``loss_mask`` and ``position_ids`` with 0.

    Packed samples (those with ``seq_lens``, see :mod:`nemo_aligner.data.packing`) also give
    ``cu_seqlens``, an int32 tensor of segment boundaries over the row-major flattened
    batch (``b * s`` tokens): every packed sample is a segment, and so is each row's padding
    tail; ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = b * s``. ``max_seqlen`` is the longest
    segment. Mixing packed and unpacked samples is an error.

    Packed samples may also carry ``prefix_lens`` (one per segment, as ``seq_lens``): a
    segment with ``prefix_lens = L > 0`` continues the first ``L`` tokens of the segment
    before it in its row (a shared prompt, see
    :class:`~nemo_aligner.data.preference.PackedGroupDataset`). The batch then has
    ``prefix_lens``, one int per ``cu_seqlens`` segment (0 for padding tails).
    """
    lengths = [len(x["tokens"]) for x in samples]
    seq_len = max(lengths)
    if pad_to is not None:
        if pad_to < seq_len:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({seq_len} tokens)")
        seq_len = pad_to
    seq_len = -(-seq_len // pad_to_multiple_of) * pad_to_multiple_of

    batch = {}
    for key, fill in (("tokens", pad_id), ("labels", pad_id), ("loss_mask", 0), ("position_ids", 0)):
        out = torch.full((len(samples), seq_len), fill, dtype=torch.long)
        for row, x in enumerate(samples):
            out[row, : len(x[key])] = x[key]
        batch[key] = out

    packed = ["seq_lens" in x for x in samples]
    if any(packed):
        if not all(packed):
            raise ValueError("cannot collate packed and unpacked samples together")
        boundaries, prefixes = [0], []
        shared = any("prefix_lens" in x for x in samples)
        for row, (x, n) in enumerate(zip(samples, lengths)):
            seg_lens = x["seq_lens"].tolist()
            row_prefixes = x["prefix_lens"].tolist() if "prefix_lens" in x else [0] * len(seg_lens)
            for k, (seg_len, prefix) in enumerate(zip(seg_lens, row_prefixes)):
                if prefix and (k == 0 or prefix > seg_lens[k - 1]):
                    raise ValueError(f"packed segment {k} of row {row} continues {prefix} tokens of a previous segment it does not have")
                boundaries.append(boundaries[-1] + seg_len)
                prefixes.append(prefix)
            if n < seq_len:
                boundaries.append((row + 1) * seq_len)
                prefixes.append(0)
        cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        batch["cu_seqlens"] = cu_seqlens
        batch["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if shared:
            batch["prefix_lens"] = torch.tensor(prefixes, dtype=torch.int32)
    return batch


def make_padding_sample(like_sample: dict) -> dict:
    """A copy of ``like_sample`` with ``loss_mask`` all zero: a filler that contributes
    nothing to the loss, used to give every data-parallel rank the same number of
    micro-batches in a final partial batch."""
    sample = {key: value.clone() for key, value in like_sample.items()}
    sample["loss_mask"] = torch.zeros_like(sample["loss_mask"])
    return sample
