"""NeMo's special-token chat template with SteerLM attribute labels (attribute-conditioned SFT).

A line is ``{"system", "mask", "type", "conversations": [{"from", "value", "label"?}, ...]}``:
``mask`` names the role whose turns carry no loss (default ``"User"``), ``type`` is
``VALUE_TO_TEXT`` (the label conditions the response) or ``TEXT_TO_VALUE`` (the response
conditions the label, which is learned), or absent (no labels). With NeMo's default tokens
(``model.data.chat_prompt_tokens``) a VALUE_TO_TEXT line renders as::

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{value}\\n<extra_id_1>Assistant\\n<extra_id_2>{label}\\n{value}\\n<extra_id_1>

and a TEXT_TO_VALUE assistant turn as ``<extra_id_1>Assistant\\n{value}\\n<extra_id_2>{label}\\n``.
A turn's label line is there when its ``label`` is a string (``null``: none).

Loss (NeMo's masking): the header, and the whole first turn when the line is not
TEXT_TO_VALUE, carry none. In the mask role's turns only the leading turn-start token(s) are
learned (they end the previous reply) from the third turn on (from the second for
TEXT_TO_VALUE). Other turns learn everything after their name line, except the label line for
VALUE_TO_TEXT; for TEXT_TO_VALUE the label after the label-start token is learned and the
response is context. When the last turn is not the mask role's, a final turn-start token is
learned too (the end of the reply; no EOS is added).

Where the tokenizer has a Hugging Face chat template and ``model.data.chat_prompt_tokens`` is
not set, the conversation goes through that template instead, the label line inside the
assistant message (:func:`render_with_chat_template`).
"""

from nemo_aligner.data.steerlm import ATTRIBUTES, parse_label
from nemo_aligner.data.templates import append_segment

DEFAULT_CHAT_PROMPT_TOKENS = {
    "system_turn_start": "<extra_id_0>",
    "turn_start": "<extra_id_1>",
    "label_start": "<extra_id_2>",
    "end_of_turn": "\n",
    "end_of_name": "\n",
}
TYPES = ("VALUE_TO_TEXT", "TEXT_TO_VALUE")
SYSTEM_NAME = "System"


def chat_prompt_tokens(overrides=None) -> dict:
    """NeMo's defaults updated with ``model.data.chat_prompt_tokens`` (unknown keys refused)."""
    tokens = dict(DEFAULT_CHAT_PROMPT_TOKENS)
    for key, value in dict(overrides or {}).items():
        if key not in tokens:
            raise ValueError(f"model.data.chat_prompt_tokens.{key}: unknown; the keys are {', '.join(tokens)}")
        if not isinstance(value, str):
            raise ValueError(f"model.data.chat_prompt_tokens.{key} must be a string, got {value!r}")
        tokens[key] = value
    return tokens


def is_steerlm_sample(sample: dict) -> bool:
    """A conversation in this format: it has ``type`` or ``mask``, or a turn has a ``label``."""
    turns = sample.get("conversations")
    return "type" in sample or "mask" in sample or (
        isinstance(turns, list) and any(isinstance(t, dict) and "label" in t for t in turns))


def _checked(sample: dict, attributes) -> tuple:
    """``(type, turns, system, mask_role)`` of a valid line; ``ValueError`` naming the field."""
    kind = sample.get("type")
    if kind is not None and kind not in TYPES:
        raise ValueError(f"field 'type' is {kind!r}; use VALUE_TO_TEXT or TEXT_TO_VALUE")
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' must be a non-empty list of turns")
    system = sample.get("system", "")
    if not isinstance(system, str):
        raise ValueError("field 'system' must be a string")
    mask_role = sample.get("mask", "User")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] needs a string 'from' and a string 'value'")
        label = turn.get("label")
        if label is not None:
            if not isinstance(label, str):
                raise ValueError(f"conversations[{i}].label must be a string like 'quality:4,verbosity:2' or null")
            parse_label(label, attributes, where=f"conversations[{i}].label")
    if all(turn["from"] == mask_role for turn in turns):
        raise ValueError(f"field 'conversations' has no assistant turn (every turn is from the mask role {mask_role!r}), "
                         "so there is nothing to train on")
    return kind, turns, system, mask_role


def render_segments(sample: dict, tokens: dict | None = None, attributes=ATTRIBUTES) -> list[tuple[str, bool]]:
    """``[(text, is_loss), ...]`` of one line (see the module docstring). ``ValueError`` naming
    the field for a bad ``type``, a malformed label or unknown attribute, or no reply to learn."""
    t = tokens or DEFAULT_CHAT_PROMPT_TOKENS
    kind, turns, system, mask_role = _checked(sample, attributes)

    segments = [(f"{t['system_turn_start']}{SYSTEM_NAME}{t['end_of_name']}{system}{t['end_of_turn']}", False)]
    for i, turn in enumerate(turns):
        speaker, value, label = turn["from"], turn["value"], turn.get("label")
        name = f"{t['turn_start']}{speaker}{t['end_of_name']}"
        body = value + t["end_of_turn"]
        label_line = f"{t['label_start']}{label}{t['end_of_name']}" if isinstance(label, str) else ""
        if kind == "TEXT_TO_VALUE":
            pieces = [name, body, label_line]
        else:
            pieces = [name, label_line, body] if kind == "VALUE_TO_TEXT" else [name, body]
        if i == 0 and kind != "TEXT_TO_VALUE":
            loss = [False] * len(pieces)
        elif speaker == mask_role:
            if i >= 1 + (kind != "TEXT_TO_VALUE"):  # the turn start ends the previous reply
                append_segment(segments, t["turn_start"], True)
                pieces[0] = pieces[0][len(t["turn_start"]):]
            loss = [False] * len(pieces)
        elif kind == "TEXT_TO_VALUE" and label_line:
            pieces = [name, body, t["label_start"], label_line[len(t["label_start"]):]]
            loss = [False, False, False, True]
        else:
            loss = [False, False, True] if kind == "VALUE_TO_TEXT" else [False, True, True][: len(pieces)]
        for piece, is_loss in zip(pieces, loss):
            append_segment(segments, piece, is_loss)
    if turns[-1]["from"] != mask_role:
        append_segment(segments, t["turn_start"], True)
    if not any(is_loss and text for text, is_loss in segments):
        raise ValueError("nothing to train on: the only assistant turn is the first one (context for the rest); "
                         "start the conversation with the user's turn")
    return segments


def render_with_chat_template(sample: dict, chat_template, tokens: dict | None = None,
                              attributes=ATTRIBUTES) -> list[tuple[str, bool]]:
    """``[(text, is_loss), ...]`` of one line through a tokenizer's Hugging Face chat template:
    the ``mask`` role's turns are user messages, the others assistant messages (learned, as the
    template marks them), the system turn a system message when not empty. The label line goes
    inside the assistant message: before the reply for VALUE_TO_TEXT (``{label_start}{label}
    {end_of_name}{value}``, not learned), after it for TEXT_TO_VALUE
    (``{value}{end_of_turn}{label_start}{label}``, only the label and the template's end of turn
    learned)."""
    t = tokens or DEFAULT_CHAT_PROMPT_TOKENS
    kind, turns, system, mask_role = _checked(sample, attributes)
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for turn in turns:
        label = turn.get("label") if kind is not None and isinstance(turn.get("label"), str) else None
        if turn["from"] == mask_role:
            messages.append({"role": "user", "content": turn["value"]})
            continue
        if label is None:
            content, context = turn["value"], ""
        elif kind == "VALUE_TO_TEXT":
            context = f"{t['label_start']}{label}{t['end_of_name']}"
            content = context + turn["value"]
        else:
            context = f"{turn['value']}{t['end_of_turn']}{t['label_start']}"
            content = context + label
        messages.append({"role": "assistant", "content": content})
        replies.append(context)
    out = []
    pending = iter(replies)
    for text, is_loss in chat_template.segments(messages):
        context = next(pending, None) if is_loss else ""
        if is_loss and context and not text.startswith(context):
            raise ValueError("the tokenizer's chat template rewrites the SteerLM label line; set "
                             "model.data.chat_prompt_tokens to use NeMo's template instead")
        append_segment(out, context, False)
        append_segment(out, text[len(context):], is_loss)
    return out


def conditioned_prompt(user_text: str, label: str, system: str = "", tokens: dict | None = None,
                       user: str = "User", assistant: str = "Assistant", chat_template=None) -> str:
    """The prompt that asks for a reply with the attributes ``label`` (VALUE_TO_TEXT, one user
    turn), in NeMo's template or, given ``chat_template``, in the tokenizer's (see
    :func:`render_with_chat_template`)."""
    t = tokens or DEFAULT_CHAT_PROMPT_TOKENS
    if chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
        return chat_template.render(messages, add_generation_prompt=True) + f"{t['label_start']}{label}{t['end_of_name']}"
    return (f"{t['system_turn_start']}{SYSTEM_NAME}{t['end_of_name']}{system}{t['end_of_turn']}"
            f"{t['turn_start']}{user}{t['end_of_name']}{user_text}{t['end_of_turn']}"
            f"{t['turn_start']}{assistant}{t['end_of_name']}{t['label_start']}{label}{t['end_of_name']}")
