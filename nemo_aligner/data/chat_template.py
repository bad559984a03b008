"""Hugging Face chat templates (Jinja), rendered the way ``transformers`` renders them.

A tokenizer directory's template comes from ``chat_template.jinja`` or the
``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of named templates
of which ``default`` is used). Templates are untrusted text from model hubs, so they run in
Jinja's immutable sandbox. The render context is the one templates are written against:
``messages``, ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``,
...) as strings, ``raise_exception(msg)``, ``strftime_now(fmt)`` and a ``tojson`` filter
that does not HTML-escape. ``{% generation %}`` blocks (assistant-token markers some
templates carry) render their body unchanged.

:meth:`ChatTemplate.segments` splits a rendered conversation into prompt and response text
for training: assistant turns (with whatever the template closes them with) are the
response, the rest is context.
"""

import functools
import json
import os
from datetime import datetime

from nemo_aligner.data.templates import append_segment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@functools.cache
def _environment_parts():
    """Jinja's sandbox and our ``{% generation %}`` extension, imported when a template is
    first compiled (most runs have none; Jinja is ~16 ms of start-up)."""
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return ImmutableSandboxedEnvironment, GenerationBlock


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _token_string(value):
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict | None = None):
        environment, generation_block = _environment_parts()
        env = environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", generation_block])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.source = source
        self._template = env.from_string(source)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None,
               documents=None, **kwargs) -> str:
        """The conversation as text; ``add_generation_prompt`` appends the assistant header.

        ``tools`` and ``documents`` are always defined (None by default), as templates expect.
        """
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            documents=documents, **self.special_tokens, **kwargs,
        )

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """``[(text, is_response), ...]`` whose concatenation is ``render(messages)``.

        Assistant turn ``i`` is the text ``render(messages[:i + 1])`` adds after
        ``render(messages[:i], add_generation_prompt=True)``. Raises ``ValueError`` for a
        template whose renders of successive prefixes do not extend each other (the split
        would be ill-defined).
        """
        out: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    f"the chat template does not render turn {i} as an extension of the turns "
                    "before it, so assistant text cannot be located; use a template without "
                    "history rewriting, or give the data as {'input', 'output'}"
                )
            append_segment(out, prompt[len(done):], False)
            append_segment(out, full[len(prompt):], True)
            done = full
        append_segment(out, self.render(messages)[len(done):], False)
        return out


def load_chat_template(tokenizer_dir) -> "ChatTemplate | None":
    """The chat template of a Hugging Face tokenizer directory, or None when it has none."""
    if tokenizer_dir is None or not os.path.isdir(tokenizer_dir):
        return None
    config = {}
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    source = None
    jinja_path = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default")
    if not source:
        return None
    special = {key: _token_string(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
    special_map = os.path.join(tokenizer_dir, "special_tokens_map.json")
    if os.path.isfile(special_map):
        with open(special_map, encoding="utf-8") as f:
            for key, value in json.load(f).items():
                if special.get(key) is None and key in SPECIAL_TOKEN_KEYS:
                    special[key] = _token_string(value)
    return ChatTemplate(source, special)
