"""Datasets for preference training: pairs (DPO family, Bradley-Terry reward models),
rated texts (regression reward models) and unpaired KTO samples, plus their collate
function and packing.

Formats (one JSON object per line):

- preference: ``{"prompt", "chosen_response", "rejected_response"}``, optionally
  ``"chosen_reward"``, ``"rejected_reward"`` (numbers; the ``rpo_*`` losses need them) and
  ``"margin"`` (a number; the ``margin_bt`` / ``scaled_bt`` reward losses use it, defaulting
  to ``chosen_reward - rejected_reward``). ``prompt`` is either a string with the template
  already applied, or an OpenAI-style message list (``[{"role", "content"}, ...]``) rendered
  through the chat template, in which case each response is a string, an assistant message
  ``{"role": "assistant", "content"}``, or a one-message list of it.
- regression reward model: ``{"text", "label": [...]}``: ``label`` has one number per
  attribute, ``-100`` (or ``null``) where an attribute is not rated.
- KTO: ``{"prompt", "response", "preference"}`` with ``preference`` true/false (or 1/0, or
  ``"desirable"``/``"undesirable"``).

A sequence is ``[bos]? + prompt + response + [eos]?``; its mask marks the response tokens
(and the EOS). A sequence longer than ``max_seq_length`` follows ``truncation``:
``error`` (stop, naming file, line, field and length), ``truncate`` (cut the response's end;
a pair whose prompt leaves no room for a response is dropped) or ``drop``. Truncated and
dropped samples are counted (``num_truncated``, ``num_dropped``) and logged by the builders.

**Groups.** Every dataset item is a *group*: ``{"sequences": [seq, ...], <unit tensors>}``,
where each ``seq`` has ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (shifted for
next-token prediction when ``shift=True``, else the raw ids) and the unit tensors are
concatenated along dim 0 by :func:`group_collate`: ``weight`` (1 per pair/sample, 0 for
padding), ``sample_ids``, and per dataset ``ref_logps``/``gt_rewards`` (one value per
sequence), ``margin``, ``attribute_labels`` or ``desirable``. A pair contributes its chosen
sequence then its rejected one, so sequence ``2k`` / ``2k+1`` of a batch are pair ``k``.
A packed group (:class:`PackedGroupDataset`) holds several units in one row.
"""

import copy

import torch

from nemo_aligner.data.datasets import check_tokenization_options, data_files, display_path, read_data_files, sft_collate
from nemo_aligner.data.errors import DataError
from nemo_aligner.data.packing import PackedDataset
from nemo_aligner.data.templates import render_chat_segments
from nemo_aligner.data.tokenizers import Tokenizer

MISSING_LABEL = -100.0


# ---------------------------------------------------------------------------- rendering
def _type_name(value) -> str:
    return "missing" if value is None else type(value).__name__


def _response_text(response, field: str) -> str:
    """The text of a response given as a string, an assistant message, or a list of one."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if isinstance(response, dict):
        role = str(response.get("role", "assistant")).lower()
        if role not in ("assistant", "gpt") or not isinstance(response.get("content"), str):
            raise ValueError(f"field '{field}' must be an assistant message {{'role': 'assistant', 'content': str}}")
        return response["content"]
    if not isinstance(response, str):
        raise ValueError(f"field '{field}' must be a string or an assistant message, got {_type_name(response)}")
    return response


def render_prompt_response(prompt, response, response_field: str = "response", chat_template=None):
    """``(prompt_text, response_text, closed)`` for one prompt and one of its responses.

    A string prompt is used as is (its template is already applied) and the response must
    be a string. A message-list prompt is rendered as a conversation whose final assistant
    turn is the response, with ``chat_template`` (a tokenizer's Hugging Face template) when
    given, else the built-in chat format: the prompt text ends where the assistant's reply
    starts, the response text is the reply as the template writes it (with whatever closes
    the turn). ``closed`` is True when a Hugging Face template closed the turn itself, so no
    EOS should follow. This is the one place that knows how conversations become text;
    raises ``ValueError`` naming the offending field.
    """
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError(
                f"field '{response_field}' must be a string when 'prompt' is a string, got {_type_name(response)}"
            )
        return prompt, response, False
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"field 'prompt' must be a string or a non-empty list of messages, got {_type_name(prompt)}")
    text = _response_text(response, response_field)
    try:
        segments = render_chat_segments({"messages": [*prompt, {"role": "assistant", "content": text}]}, chat_template)
    except ValueError as e:
        raise ValueError(str(e).replace("field 'messages'", "field 'prompt'").replace("messages[", "prompt[")) from None
    last = max(i for i, (_, is_response) in enumerate(segments) if is_response)
    # Text a template puts after the final turn belongs to the scored sequence too.
    response_text = "".join(t for t, _ in segments[last:])
    return "".join(t for t, _ in segments[:last]), response_text, chat_template is not None


# ---------------------------------------------------------------------------- sequences
def make_sequence(ids: torch.Tensor, mask: torch.Tensor, shift: bool, shared_prefix: int = 0) -> dict:
    """A collatable sequence: shifted for next-token log-probs, or the raw ids (reward models).

    ``shared_prefix``: its first that many tokens equal those of the previous sequence of
    its group and score nothing, so a pack may compute them once (see
    :class:`PackedGroupDataset`)."""
    if shift:
        seq = {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": mask[1:], "position_ids": torch.arange(len(ids) - 1)}
    else:
        seq = {"tokens": ids, "labels": ids, "loss_mask": mask, "position_ids": torch.arange(len(ids))}
    if shared_prefix:
        seq["shared_prefix"] = shared_prefix
    return seq


def _number(sample: dict, field: str):
    value = sample.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field '{field}' must be a number, got {_type_name(value)}")
    return float(value)


class _Tokenized:
    """Shared tokenization, length policy and bookkeeping of the datasets below."""

    def __init__(self, path, tokenizer: Tokenizer, max_seq_length: int, truncation: str,
                 add_bos: bool, add_eos: bool, shift: bool):
        check_tokenization_options(tokenizer, truncation, add_bos, add_eos)
        self.path = display_path(path)
        self.files = data_files(path)
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.truncation = truncation
        self.add_bos, self.add_eos, self.shift = add_bos, add_eos, shift
        self.num_truncated = 0
        self.num_dropped = 0

    def prefix_ids(self, prompt_text: str) -> list[int]:
        return ([self.tokenizer.bos_id] if self.add_bos else []) + self.tokenizer.text_to_ids(prompt_text)

    def response_ids(self, response_text: str, closed: bool = False) -> list[int]:
        """Token ids of a response, plus EOS (when ``add_eos``, unless a chat template already
        closed the turn)."""
        eos = [self.tokenizer.eos_id] if self.add_eos and not closed else []
        return self.tokenizer.text_to_ids(response_text) + eos

    def fit(self, prefix: list[int], response: list[int], where: str, field: str):
        """``(ids, mask, truncated)`` of ``prefix + response`` within ``max_seq_length``, or
        ``None`` when the policy drops it. Raises :class:`DataError` under ``error``."""
        n, limit = len(prefix) + len(response), self.max_seq_length
        truncated = False
        if n > limit:
            if self.truncation == "error":
                raise DataError(
                    f"{where}: '{field}' gives {n} tokens with its prompt, more than max_seq_length {limit}; "
                    "raise model.data.max_seq_length or set model.data.truncation=truncate or model.data.truncation=drop"
                )
            if self.truncation == "drop":
                return None
            response = response[: max(limit - len(prefix), 0)]
            truncated = True
        ids = prefix + response
        mask = [0] * len(prefix) + [1] * len(response)
        trained = mask[1:] if self.shift else mask
        if not any(trained):
            if truncated:
                return None  # the prompt alone fills the budget
            raise DataError(
                f"{where}: '{field}' leaves nothing to score (no response token after the first token); "
                "give a non-empty response or prompt, or set model.data.add_bos=true"
            )
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long), truncated

    def shared_prefix(self, prefix_a: list[int], prefix_b: list[int]) -> int:
        """How many leading tokens of a shifted sequence with prompt ``prefix_b`` equal those
        of one with prompt ``prefix_a`` and score nothing: all but the prompt's last token,
        whose label is the response's first. 0 unshifted (a reward model reads every token
        it is given) or when the prompts differ."""
        return max(len(prefix_a) - 1, 0) if self.shift and prefix_a == prefix_b else 0

    def seq_length(self, ids: torch.Tensor) -> int:
        return len(ids) - 1 if self.shift else len(ids)

    def check_not_empty(self, count: int) -> None:
        if count == 0:
            raise DataError(
                f"{self.path}:1: no samples left: all {self.num_dropped} are longer than max_seq_length "
                f"{self.max_seq_length}; raise max_seq_length or set model.data.truncation=truncate"
            )


# ---------------------------------------------------------------------------- datasets
class PreferenceDataset(torch.utils.data.Dataset, _Tokenized):
    """Preference pairs, tokenized and validated at construction.

    ``shift=True`` (DPO): sequences are shifted for log-probs, ``lengths[i]`` is the pair's
    shifted token count. ``shift=False`` (reward models): raw ids, the reward is read at the
    last token. ``require_gt_rewards`` / ``require_margin`` make those fields mandatory.
    ``ref_logps`` (``[N, 2]`` float32, NaN until filled) holds reference log-prob sums per
    pair, set by :func:`nemo_aligner.algorithms.reference.precompute_reference_logps`.
    """

    def __init__(self, path, tokenizer, max_seq_length, *, truncation="error", add_bos=False, add_eos=True,
                 shift=True, require_gt_rewards=False, require_margin=False):
        _Tokenized.__init__(self, path, tokenizer, max_seq_length, truncation, add_bos, add_eos, shift)
        self.pairs = []  # (chosen ids, chosen mask, rejected ids, rejected mask)
        self.shared = []  # leading tokens the rejected sequence shares with the chosen one
        self.num_identical = 0  # pairs whose chosen and rejected sequences are the same tokens
        gt, margins = [], []
        for where, sample in read_data_files(self.files):
            try:
                texts, rewards, margin = self._parse(sample, require_gt_rewards, require_margin, tokenizer.chat_template)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            (prompt_c, text_c, closed_c), (prompt_r, text_r, closed_r) = texts
            prefix_c = self.prefix_ids(prompt_c)
            chosen = self.fit(prefix_c, self.response_ids(text_c, closed_c), where, "chosen_response")
            prefix_r = prefix_c if prompt_r == prompt_c else self.prefix_ids(prompt_r)
            rejected = self.fit(prefix_r, self.response_ids(text_r, closed_r), where, "rejected_response")
            if chosen is None or rejected is None:
                self.num_dropped += 1
                continue
            self.num_truncated += int(chosen[2] or rejected[2])
            self.num_identical += int(torch.equal(chosen[0], rejected[0]))
            self.pairs.append((chosen[0], chosen[1], rejected[0], rejected[1]))
            self.shared.append(self.shared_prefix(prefix_c, prefix_r))
            gt.append(rewards)
            margins.append(margin)
        self.check_not_empty(len(self.pairs))
        self.gt_rewards = torch.tensor(gt, dtype=torch.float32)  # NaN where absent
        self.margins = torch.tensor(margins, dtype=torch.float32)
        self.ref_logps = torch.full((len(self.pairs), 2), float("nan"), dtype=torch.float32)
        self.lengths = [self.seq_length(c) + self.seq_length(r) for c, _, r, _ in self.pairs]

    @staticmethod
    def _parse(sample, require_gt_rewards, require_margin, chat_template):
        for field in ("prompt", "chosen_response", "rejected_response"):
            if field not in sample:
                raise ValueError(f"missing field '{field}' (preference lines need 'prompt', 'chosen_response', 'rejected_response')")
        chosen = render_prompt_response(sample["prompt"], sample["chosen_response"], "chosen_response", chat_template)
        rejected = render_prompt_response(sample["prompt"], sample["rejected_response"], "rejected_response", chat_template)
        rc, rr = _number(sample, "chosen_reward"), _number(sample, "rejected_reward")
        if require_gt_rewards and (rc is None or rr is None):
            missing = "chosen_reward" if rc is None else "rejected_reward"
            raise ValueError(f"missing field '{missing}'; the rpo_* and scale losses need 'chosen_reward' and 'rejected_reward' on every line")
        margin = _number(sample, "margin")
        if margin is None and rc is not None and rr is not None:
            margin = rc - rr
        if require_margin and margin is None:
            raise ValueError("missing field 'margin'; this reward loss needs 'margin' (or 'chosen_reward' and 'rejected_reward') on every line")
        nan = float("nan")
        return (chosen, rejected), [nan if rc is None else rc, nan if rr is None else rr], (nan if margin is None else margin)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        c_ids, c_mask, r_ids, r_mask = self.pairs[i]
        return {
            "sequences": [make_sequence(c_ids, c_mask, self.shift),
                          make_sequence(r_ids, r_mask, self.shift, shared_prefix=self.shared[i])],
            "weight": torch.ones(1),
            "sample_ids": torch.tensor([i]),
            "gt_rewards": self.gt_rewards[i].clone(),
            "margin": self.margins[i : i + 1].clone(),
            "ref_logps": self.ref_logps[i].clone(),
        }


class RegressionRewardDataset(torch.utils.data.Dataset, _Tokenized):
    """``{"text", "label": [...]}`` samples for a regression (SteerLM-style) reward model.

    The whole ``text`` (plus EOS) is one unshifted sequence whose reward is read at its last
    token; ``label`` must have ``num_attributes`` entries, each a number, ``-100`` or ``null``
    (not rated). Items carry ``attribute_labels`` ``[1, num_attributes]``.
    """

    def __init__(self, path, tokenizer, max_seq_length, num_attributes: int, *, truncation="error",
                 add_bos=False, add_eos=True):
        _Tokenized.__init__(self, path, tokenizer, max_seq_length, truncation, add_bos, add_eos, shift=False)
        self.num_attributes = int(num_attributes)
        self.samples, labels = [], []
        for where, sample in read_data_files(self.files):
            try:
                text, label = self._parse(sample)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            fitted = self.fit(self.prefix_ids(""), self.response_ids(text), where, "text")
            if fitted is None:
                self.num_dropped += 1
                continue
            self.num_truncated += int(fitted[2])
            self.samples.append((fitted[0], fitted[1]))
            labels.append(label)
        self.check_not_empty(len(self.samples))
        self.labels = torch.tensor(labels, dtype=torch.float32)
        self.lengths = [len(ids) for ids, _ in self.samples]

    def _parse(self, sample):
        if not isinstance(sample.get("text"), str):
            raise ValueError(f"field 'text' must be a string, got {_type_name(sample.get('text'))} (regression lines need 'text' and 'label')")
        label = sample.get("label")
        if not isinstance(label, list):
            raise ValueError(f"field 'label' must be a list of {self.num_attributes} numbers, got {_type_name(label)}")
        if len(label) != self.num_attributes:
            raise ValueError(
                f"field 'label' has {len(label)} values but model.num_attributes is {self.num_attributes}; "
                "give one value per attribute (-100 where not rated) or change model.num_attributes"
            )
        values = []
        for k, v in enumerate(label):
            if v is None:
                v = MISSING_LABEL
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"field 'label[{k}]' must be a number or -100 (not rated), got {_type_name(v)}")
            values.append(float(v))
        return sample["text"], values

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        ids, mask = self.samples[i]
        # The mask marks every real token: a regression reward reads the whole text.
        return {
            "sequences": [make_sequence(ids, torch.ones_like(mask), shift=False)],
            "weight": torch.ones(1),
            "sample_ids": torch.tensor([i]),
            "attribute_labels": self.labels[i : i + 1].clone(),
        }


class RewardScoringDataset(torch.utils.data.Dataset, _Tokenized):
    """Lines to score with a reward model, each one of

    - ``{"text"}``: the whole text (as in regression data);
    - ``{"prompt", "response"}``: one response (prompt string or message list);
    - ``{"prompt", "chosen_response", "rejected_response"}``: both responses of a pair;

    other fields are kept (``lines``) and written back by the scoring command. Items are
    groups of one or two unshifted sequences; ``kinds[i]`` says which form line ``i`` has.
    Sequences are tokenized exactly as in reward-model training.
    """

    def __init__(self, path, tokenizer, max_seq_length, *, truncation="error", add_bos=False, add_eos=True):
        _Tokenized.__init__(self, path, tokenizer, max_seq_length, truncation, add_bos, add_eos, shift=False)
        self.lines, self.kinds, self.sequences = [], [], []
        for where, sample in read_data_files(self.files):
            try:
                kind, pieces = self._parse(sample, tokenizer.chat_template)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            fitted = [self.fit(self.prefix_ids(p), self.response_ids(r, closed), where, field)
                      for (p, r, closed), field in pieces]
            if any(f is None for f in fitted):
                self.num_dropped += 1
                continue
            self.num_truncated += int(any(f[2] for f in fitted))
            self.lines.append(sample)
            self.kinds.append(kind)
            self.sequences.append([(f[0], f[1]) for f in fitted])
        self.check_not_empty(len(self.lines))

    @staticmethod
    def _parse(sample, chat_template):
        if "chosen_response" in sample or "rejected_response" in sample:
            for field in ("prompt", "chosen_response", "rejected_response"):
                if field not in sample:
                    raise ValueError(f"missing field '{field}' (a pair needs 'prompt', 'chosen_response', 'rejected_response')")
            return "pair", [
                (render_prompt_response(sample["prompt"], sample[f], f, chat_template), f)
                for f in ("chosen_response", "rejected_response")
            ]
        if "prompt" in sample or "response" in sample:
            for field in ("prompt", "response"):
                if field not in sample:
                    raise ValueError(f"missing field '{field}' (give 'text', or 'prompt' and 'response')")
            return "single", [(render_prompt_response(sample["prompt"], sample["response"], "response", chat_template), "response")]
        if not isinstance(sample.get("text"), str):
            raise ValueError("field 'text' must be a string (lines need 'text', 'prompt' + 'response', or a preference pair)")
        return "single", [(("", sample["text"], False), "text")]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> dict:
        return {
            "sequences": [make_sequence(ids, mask, shift=False) for ids, mask in self.sequences[i]],
            "sample_ids": torch.tensor([i]),
        }


def _preference_flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("desirable", "undesirable"):
        return value.lower() == "desirable"
    raise ValueError(f"field 'preference' must be true/false (or 1/0, or 'desirable'/'undesirable'), got {value!r}")


class KTODataset(torch.utils.data.Dataset, _Tokenized):
    """Unpaired ``{"prompt", "response", "preference"}`` samples for KTO.

    Each item holds two shifted sequences: the sample itself ``(x_i, y_i)`` and a mismatched
    one ``(x_i, y_j)`` with ``j = kl_partner[i]``, used only for KTO's KL reference point. The
    partners are a fixed seeded derangement (a random cycle through all samples), so the
    mismatched sequences do not depend on batching or the parallel layout and their
    reference log-probs can be precomputed. A mismatched response is cut to fit
    ``max_seq_length`` whatever the truncation policy (it is never trained on).
    """

    def __init__(self, path, tokenizer, max_seq_length, *, truncation="error", add_bos=False, add_eos=True, seed=1234):
        _Tokenized.__init__(self, path, tokenizer, max_seq_length, truncation, add_bos, add_eos, shift=True)
        self.samples, flags = [], []  # (prefix ids, response ids, fitted ids, fitted mask)
        for where, sample in read_data_files(self.files):
            try:
                for field in ("prompt", "response", "preference"):
                    if field not in sample:
                        raise ValueError(f"missing field '{field}' (KTO lines need 'prompt', 'response', 'preference')")
                prompt, response, closed = render_prompt_response(
                    sample["prompt"], sample["response"], "response", tokenizer.chat_template
                )
                flag = _preference_flag(sample["preference"])
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            prefix, resp = self.prefix_ids(prompt), self.response_ids(response, closed)
            fitted = self.fit(prefix, resp, where, "response")
            if fitted is None:
                self.num_dropped += 1
                continue
            self.num_truncated += int(fitted[2])
            self.samples.append((prefix, resp, fitted[0], fitted[1]))
            flags.append(flag)
        self.check_not_empty(len(self.samples))
        self.desirable = torch.tensor(flags, dtype=torch.float32)
        n = len(self.samples)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.kl_partner = [0] * n
        for k, i in enumerate(order):
            self.kl_partner[i] = order[(k + 1) % n]
        self.ref_logps = torch.full((n, 2), float("nan"), dtype=torch.float32)
        self._kl = [self._kl_sequence(i) for i in range(n)]
        self.lengths = [self.seq_length(s[2]) + self.seq_length(k[0]) for s, k in zip(self.samples, self._kl)]
        self.shared = [self.shared_prefix(s[0], s[0]) for s in self.samples]

    def _kl_sequence(self, i: int):
        prefix = self.samples[i][0]
        response = self.samples[self.kl_partner[i]][1][: max(self.max_seq_length - len(prefix), 1)]
        ids = torch.tensor(prefix + response, dtype=torch.long)
        mask = torch.tensor([0] * len(prefix) + [1] * len(response), dtype=torch.long)
        return ids, mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        _, _, ids, mask = self.samples[i]
        kl_ids, kl_mask = self._kl[i]
        return {
            "sequences": [make_sequence(ids, mask, True), make_sequence(kl_ids, kl_mask, True, shared_prefix=self.shared[i])],
            "weight": torch.ones(1),
            "sample_ids": torch.tensor([i]),
            "desirable": self.desirable[i : i + 1].clone(),
            "ref_logps": self.ref_logps[i].clone(),
        }


# ---------------------------------------------------------------------------- batches
def group_length(group: dict) -> int:
    """Tokens of the longest row this group makes (all its sequences when packed)."""
    lengths = [len(s["tokens"]) for s in group["sequences"]]
    return sum(lengths) if group.get("packed", False) else max(lengths)


def padding_group(like: dict) -> dict:
    """A filler group shaped like ``like`` that carries no loss: zero weight, zero loss mask,
    and finite zeros in every value tensor (so no NaN can reach a gradient through a
    masked-out term)."""
    group = copy.deepcopy(like)
    for seq in group["sequences"]:
        seq["loss_mask"] = torch.zeros_like(seq["loss_mask"])
    for key, value in group.items():
        if torch.is_tensor(value) and key != "sample_ids":
            group[key] = torch.zeros_like(value)
    return group


def group_collate(groups: list[dict], pad_id: int, pad_to: int | None = None, pad_to_multiple_of: int = 1) -> dict:
    """Batch groups into ``[rows, s]`` tensors (see the module docstring).

    Unpacked: every sequence is a row. Packed: every group is a row (its sequences back to
    back, with ``cu_seqlens``). Besides :func:`~nemo_aligner.data.datasets.sft_collate`'s
    keys the batch has ``seq_ids`` ``[rows, s]`` (the batch-wide index of the sequence each
    token belongs to, -1 on padding), ``last_index`` ``[num_sequences]`` (flat index into
    ``rows * s`` of each sequence's last token) and the groups' unit tensors concatenated.
    """
    packed = groups[0].get("packed", False)
    if any(g.get("packed", False) != packed for g in groups):
        raise ValueError("cannot collate packed and unpacked groups together")
    if packed:
        rows = []
        for g in groups:
            seqs = g["sequences"]
            row = {k: torch.cat([s[k] for s in seqs]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
            row["seq_lens"] = torch.tensor([len(s["tokens"]) for s in seqs], dtype=torch.long)
            if any("prefix_len" in s for s in seqs):
                row["prefix_lens"] = torch.tensor([s.get("prefix_len", 0) for s in seqs], dtype=torch.long)
            rows.append((row, [len(s["tokens"]) for s in seqs]))
    else:
        rows = [(s, [len(s["tokens"])]) for g in groups for s in g["sequences"]]
    batch = sft_collate([r for r, _ in rows], pad_id=pad_id, pad_to=pad_to, pad_to_multiple_of=pad_to_multiple_of)
    width = batch["tokens"].shape[1]
    seq_ids = torch.full(batch["tokens"].shape, -1, dtype=torch.long)
    last_index, n = [], 0
    for row, (_, lengths) in enumerate(rows):
        start = 0
        for length in lengths:
            seq_ids[row, start : start + length] = n
            last_index.append(row * width + start + length - 1)
            start += length
            n += 1
    batch["seq_ids"] = seq_ids
    batch["last_index"] = torch.tensor(last_index, dtype=torch.long)
    for key in groups[0]:
        if key not in ("sequences", "packed"):
            batch[key] = torch.cat([g[key] for g in groups])
    return batch


class PackedGroupDataset(PackedDataset):
    """Packs of groups: each item merges the groups of one bin into a single packed group
    (its sequences back to back in one row; unit tensors concatenated in the same order).

    ``dataset.lengths`` are the groups' token counts (a pair counts both sequences), so the
    bins come from the same packing algorithms as SFT. A pack never splits a group.

    ``share_prefix``: a sequence whose first ``L`` tokens equal those of the sequence before
    it in its group and score nothing (``shared_prefix``, e.g. a pair's prompt) is stored
    without them, as a continuation (``prefix_len = L``, positions from ``L``): attention
    lets it see the previous sequence's first ``L`` tokens (see
    :class:`~nemo_aligner.models.attention.SDPACoreAttention`), so a pair's prompt is
    computed once. Log-probs are those of the unshared layout.
    """

    packing_script = "prepare_packed_dpo_dataset.py"

    def __init__(self, dataset, pack_size: int, algorithm: str = "first_fit_shuffle", seed: int = 1234, bins=None,
                 check_bins: bool = True, share_prefix: bool = False):
        self.share_prefix = share_prefix
        super().__init__(dataset, pack_size, algorithm=algorithm, seed=seed, bins=bins, check_bins=check_bins)

    def item_lengths(self, dataset) -> list[int]:
        shared = getattr(dataset, "shared", None)
        if not self.share_prefix or shared is None:
            return list(dataset.lengths)
        return [n - s for n, s in zip(dataset.lengths, shared)]

    def __getitem__(self, j: int) -> dict:
        return merge_groups([self.dataset[i] for i in self.bins[j]], self.share_prefix)


def merge_groups(groups: list[dict], share_prefix: bool = False) -> dict:
    """One packed group holding ``groups`` back to back (unit tensors concatenated in order);
    with ``share_prefix`` a sequence's shared prompt is stored once (see
    :class:`PackedGroupDataset`)."""
    def sequences(group):
        if not share_prefix:
            return group["sequences"]
        out = []
        for seq in group["sequences"]:
            shared = seq.get("shared_prefix", 0)
            if shared:
                seq = {key: seq[key][shared:] for key in ("tokens", "labels", "loss_mask", "position_ids")}
                seq["prefix_len"] = shared
            out.append(seq)
        return out

    pack = {"sequences": [s for g in groups for s in sequences(g)], "packed": True}
    for key in groups[0]:
        if key not in ("sequences", "packed"):
            pack[key] = torch.cat([g[key] for g in groups])
    return pack


def merged_length(groups: list[dict], share_prefix: bool = False) -> int:
    """The row width :func:`merge_groups` gives ``groups``."""
    return sum(len(s["tokens"]) - (s.get("shared_prefix", 0) if share_prefix else 0)
               for g in groups for s in g["sequences"])


def micro_batch_collate(groups: list[dict], pad_id: int, pad_to: int | None = None, pad_to_multiple_of: int = 1,
                        share_prefix: bool = False) -> dict:
    """A micro-batch of groups packed into one row (no padding between sequences): what a
    padded batch of the same groups computes, in fewer tokens. The global batch still counts
    groups (pairs), unlike dataset-level packing."""
    if groups[0].get("packed", False):
        return group_collate(groups, pad_id, pad_to=pad_to, pad_to_multiple_of=pad_to_multiple_of)
    return group_collate([merge_groups(groups, share_prefix)], pad_id, pad_to=pad_to,
                         pad_to_multiple_of=pad_to_multiple_of)
