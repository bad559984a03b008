"""SteerLM attribute labels and annotation (NeMo-Aligner's formats).

A label is ``"quality:4,toxicity:0,humor:0,..."`` over :data:`ATTRIBUTES` (NeMo-Aligner's nine,
in its order: OpenAssistant's four, then HelpSteer's five). Annotation labels every turn of a
conversation JSONL line (``{"system", "mask", "conversations": [{"from", "value", "label"}]}``)
whose ``label`` key is present and not null, from a regression reward model's predictions on
the conversation up to and including that turn, rendered as NeMo-Aligner renders it for its
reward model (its fixed system prompt, then each turn) and followed by the label token::

    <extra_id_0>System\\n{SYSTEM_PROMPT}\\n<extra_id_1>User\\n{value}\\n<extra_id_1>Assistant\\n{value}\\n<extra_id_2>

Each prediction is clipped to [0, 4] and rounded (Python's ``round``: halves to even).
"""

import json
import os

from nemo_aligner.data.errors import DataError

OPEN_ASSISTANT_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
ATTRIBUTES = OPEN_ASSISTANT_ATTRIBUTES + HELPSTEER_ATTRIBUTES

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_TURN = "<extra_id_0>System\n{value}\n"
USER_TURN = "<extra_id_1>User\n{value}\n"
ASSISTANT_TURN = "<extra_id_1>Assistant\n{value}\n"
LABEL_PREFIX = "<extra_id_2>"
MIN_VALUE, MAX_VALUE = 0.0, 4.0


def prediction_to_values(prediction) -> list[int]:
    """A reward model's raw outputs as label values: each clipped to [0, 4], then rounded."""
    return [round(min(MAX_VALUE, max(MIN_VALUE, float(p)))) for p in prediction]


def format_label(values, attributes=ATTRIBUTES) -> str:
    """``"a1:v1,a2:v2,..."``."""
    if len(values) != len(attributes):
        raise ValueError(f"{len(values)} values for {len(attributes)} attributes")
    return ",".join(f"{a}:{v}" for a, v in zip(attributes, values))


def label_from_attributes(values: dict, attributes=ATTRIBUTES, where: str = "steerlm.attributes") -> str:
    """``"a1:v1,a2:v2"`` for ``{a2: v2, a1: v1}``, in the attributes' order (the order labels are
    written in training data); an unknown name or a value that is not a whole number raises
    ``ValueError`` naming ``where``."""
    for name, value in values.items():
        if name not in attributes:
            raise ValueError(f"{where}.{name}: unknown attribute; the attributes are {', '.join(attributes)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{name}={value!r}; it must be a whole number (e.g. 0-4)")
    return ",".join(f"{a}:{values[a]}" for a in attributes if a in values)


def parse_label(text: str, attributes=ATTRIBUTES, where: str = "label") -> dict[str, int]:
    """``{attribute: value}`` from ``"quality:4,verbosity:1"`` (any subset, any order); a
    malformed entry or an unknown attribute raises :class:`DataError` naming ``where``."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty attribute label; write it as 'quality:4,toxicity:0,...'")
    out = {}
    for entry in text.split(","):
        name, sep, value = entry.strip().partition(":")
        if not sep or not name or not value.strip().lstrip("-").isdigit():
            raise DataError(f"{where}: malformed attribute label entry {entry.strip()!r}; write 'name:integer'")
        if name not in attributes:
            raise DataError(f"{where}: unknown attribute {name!r}; the attributes are {', '.join(attributes)}")
        out[name] = int(value)
    return out


def annotation_prompts(conversation: dict, where: str = "conversation") -> list[str]:
    """The texts to score: one per turn with a ``label`` key that is not null, each the
    conversation up to and including that turn followed by :data:`LABEL_PREFIX`."""
    turns = conversation.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    user = conversation.get("mask")
    if not isinstance(user, str):
        raise DataError(f"{where}: field 'mask' must name the user role (e.g. \"User\")")
    text = SYSTEM_TURN.format(value=SYSTEM_PROMPT)
    prompts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and a string 'value'")
        template = USER_TURN if turn["from"] == user else ASSISTANT_TURN
        text += template.format(value=turn["value"])
        if turn.get("label") is not None:
            prompts.append(text + LABEL_PREFIX)
    return prompts


def conversation_key(conversation: dict) -> str:
    """What identifies a conversation across an interrupted annotation run (NeMo-Aligner's key:
    its turns' values joined)."""
    return "".join(turn["value"] for turn in conversation["conversations"])


def annotate_file(input_path, output_path, score, attributes=ATTRIBUTES, progress: bool = True,
                  texts_per_call: int = 64) -> int:
    """Label every labelled turn of ``input_path`` into ``output_path`` (appended, a line per
    conversation); ``score(texts) -> [[one value per attribute], ...]`` is called with the texts
    of several conversations at once (about ``texts_per_call``), and their lines are written,
    flushed and fsynced after each call. Conversations already in ``output_path`` (by
    :func:`conversation_key`) are skipped, so an interrupted run resumes; a partial last line
    is dropped first. Returns how many were written."""
    from tqdm import tqdm

    from nemo_aligner.data.datasets import completed_jsonl_lines, read_jsonl

    done = {conversation_key(row) for row in completed_jsonl_lines(output_path)}
    written = 0
    rows = read_jsonl(input_path)
    pending, texts = [], []
    with open(output_path, "a", encoding="utf-8") as out, tqdm(total=len(rows), desc="annotating",
                                                                 disable=not progress) as bar:
        def flush():
            nonlocal written
            labelled = iter(score(texts) if texts else [])
            for row in pending:
                for turn in row["conversations"]:
                    if turn.get("label") is not None:
                        turn["label"] = format_label(prediction_to_values(next(labelled)), attributes)
                out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())
            written += len(pending)
            pending.clear()
            texts.clear()

        for line_no, row in rows:
            prompts = annotation_prompts(row, where=f"{input_path}:{line_no}")
            key = conversation_key(row)
            bar.update(1)
            if key in done:
                continue
            done.add(key)  # a repeated conversation is labelled once, as in NeMo-Aligner
            pending.append(row)
            texts.extend(prompts)
            if len(texts) >= texts_per_call:
                flush()
        flush()
    return written
