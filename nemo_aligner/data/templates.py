"""Prompt and chat templates.

Prompt template (``{"input", "output"}`` SFT data): a string with one ``{input}`` placeholder;
the rendered prompt is followed directly by the output.

Chat format (``{"system"?, "conversations": [...]}``): our own plain-text format, one
turn per role header and each turn closed by :data:`END_OF_TURN`::

    <|system|>
    You are helpful.<|end|>
    <|user|>
    Hi<|end|>
    <|assistant|>
    Hello!<|end|>

The model is trained on each assistant turn's text plus its ``<|end|>``; everything else
(headers, system and user turns, the newlines between turns) is context only.
"""

DEFAULT_PROMPT_TEMPLATE = "{input}\n\n"

ROLE_HEADER = "<|{role}|>\n"
END_OF_TURN = "<|end|>"
TURN_SEPARATOR = "\n"
CHAT_MARKERS = tuple(ROLE_HEADER.format(role=r).strip() for r in ("system", "user", "assistant")) + (END_OF_TURN,)

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def render_prompt(template: str, input_text: str) -> str:
    """Substitute ``input_text`` for ``{input}`` in ``template`` (other braces are kept as is)."""
    check_prompt_template(template)
    return template.replace("{input}", input_text)


def check_prompt_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` contains the ``{input}`` placeholder."""
    if "{input}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{input}}' placeholder; add one where the input text goes")


def parse_messages(turns, system=None, where: str = "messages") -> list[dict]:
    """OpenAI-style ``[{"role", "content"}, ...]`` from ShareGPT ``{"from", "value"}`` or
    OpenAI ``{"role", "content"}`` turns, with ``system`` (if given) first. Roles
    (case-insensitive): ``system``, ``user``/``human``, ``assistant``/``gpt``. Raises
    ``ValueError`` naming the offending turn."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field '{where}' must be a non-empty list of turns, got {_type_name(turns)}")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"field 'system' must be a string, got {_type_name(system)}")
    parsed = [("system", system)] if system else []
    parsed += [_parse_turn(turn, f"{where}[{i}]") for i, turn in enumerate(turns)]
    return [{"role": role, "content": text} for role, text in parsed]


def render_chat_segments(sample: dict, chat_template=None) -> list[tuple[str, bool]]:
    """Render a chat sample to ``[(text, is_loss), ...]``; concatenating the texts gives the
    full conversation, and adjacent segments alternate ``is_loss``.

    ``sample`` has an optional ``"system"`` string and ``"conversations"`` (or ``"messages"``),
    turns as :func:`parse_messages` takes them. With a ``chat_template`` (a tokenizer's
    Hugging Face template) the text is that template's; otherwise the format above. Raises
    ``ValueError`` describing the offending field when the sample is malformed or has no
    assistant turn.
    """
    key = "conversations" if "conversations" in sample else "messages"
    messages = parse_messages(sample.get(key), sample.get("system"), key)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"field '{key}' has no assistant turn, so there is nothing to train on")
    if chat_template is not None:
        return chat_template.segments(messages)
    parsed = [(m["role"], m["content"]) for m in messages]

    segments: list[tuple[str, bool]] = []
    for i, (role, text) in enumerate(parsed):
        header = (TURN_SEPARATOR if i else "") + ROLE_HEADER.format(role=role)
        append_segment(segments, header, False)
        append_segment(segments, text + END_OF_TURN, role == "assistant")
    return segments


def render_chat_prompt(messages: list[dict], chat_template=None) -> str:
    """A conversation rendered as a prompt: everything up to where the assistant's next reply
    starts (the template's generation prompt, or this module's ``<|assistant|>`` header)."""
    if chat_template is not None:
        return chat_template.render(messages, add_generation_prompt=True)
    text = "".join(
        (TURN_SEPARATOR if i else "") + ROLE_HEADER.format(role=m["role"]) + m["content"] + END_OF_TURN
        for i, m in enumerate(messages)
    )
    return text + (TURN_SEPARATOR if messages else "") + ROLE_HEADER.format(role="assistant")


def _parse_turn(turn, where: str) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be an object, got {_type_name(turn)}")
    role_key, text_key = ("role", "content") if "role" in turn else ("from", "value")
    role, text = turn.get(role_key), turn.get(text_key)
    if role is None or text is None:
        raise ValueError(f"{where} needs 'from' and 'value' (or 'role' and 'content')")
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
        raise ValueError(f"{where}.{role_key} is {role!r}; use one of {sorted(_ROLE_ALIASES)}")
    if not isinstance(text, str):
        raise ValueError(f"{where}.{text_key} must be a string, got {_type_name(text)}")
    return _ROLE_ALIASES[role.lower()], text


def append_segment(segments: list[tuple[str, bool]], text: str, is_loss: bool) -> None:
    """Append a segment (none for empty text), merging it into the previous one when ``is_loss``
    matches, so adjacent segments alternate."""
    if not text:
        return
    if segments and segments[-1][1] == is_loss:
        segments[-1] = (segments[-1][0] + text, is_loss)
    else:
        segments.append((text, is_loss))


def _type_name(value) -> str:
    return "missing" if value is None else type(value).__name__
