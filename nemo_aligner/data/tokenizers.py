"""Tokenizers: one small interface over SentencePiece and Hugging Face ``tokenizers``.

Contract shared by every implementation:

- ``text_to_ids(text)`` never adds BOS/EOS; callers add them explicitly.
- ``ids_to_text(ids)`` drops the BOS, EOS and PAD ids before decoding.
- ``bos_id`` / ``eos_id`` are ``None`` when the tokenizer has no such token;
  ``pad_id`` falls back to ``eos_id`` when there is no pad token.
"""

import abc
import json
import os
import shutil
from pathlib import Path

import sentencepiece
import tokenizers

from nemo_aligner.data.chat_template import ChatTemplate, load_chat_template


class Tokenizer(abc.ABC):
    """Abstract tokenizer; see the module docstring for the contract.

    Subclasses implement ``text_to_ids``, ``_decode`` (verbatim decoding) and ``vocab_size``,
    and set ``bos_id``, ``eos_id`` and ``_pad_id`` (``None`` where the token does not exist).
    """

    @abc.abstractmethod
    def text_to_ids(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decode ``ids`` verbatim."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    bos_id: int | None
    eos_id: int | None
    _pad_id: int | None
    # The Hugging Face chat template next to the tokenizer files, if any (see chat_template.py).
    chat_template: ChatTemplate | None = None

    @property
    def pad_id(self) -> int | None:
        """The pad token's id, or ``eos_id`` when there is no pad token."""
        return self.eos_id if self._pad_id is None else self._pad_id

    def ids_to_text(self, ids: list[int]) -> str:
        """Decode ``ids``, skipping BOS, EOS and PAD."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self._decode([int(i) for i in ids if int(i) not in special])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; BOS/EOS/PAD are the model's own (``None`` if disabled)."""

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.model_path} is not a SentencePiece model ({reason}); give the .model file the "
                             "tokenizer was trained into") from None
        self.bos_id = _none_if_negative(self._sp.bos_id())
        self.eos_id = _none_if_negative(self._sp.eos_id())
        self._pad_id = _none_if_negative(self._sp.pad_id())
        self.chat_template = load_chat_template(os.path.dirname(os.path.abspath(self.model_path)))

    def text_to_ids(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (given as the file or the directory holding it).

    BOS/EOS/PAD tokens come from a sibling ``tokenizer_config.json`` (keys ``bos_token``,
    ``eos_token``, ``pad_token``; a string or ``{"content": ...}``) when it names them,
    otherwise from the first common token found in the vocabulary (``<s>``, ``</s>``,
    ``<|endoftext|>``, ``<pad>``, ...).
    """

    _COMMON_TOKENS = {
        "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
        "eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
        "pad": ("<pad>", "<|pad|>", "[PAD]"),
    }

    def __init__(self, path: str):
        path = str(path)
        self.path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 -- the library raises a bare Exception for bad files
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer file ({reason}); give a tokenizer.json "
                             "saved by the tokenizers library") from None
        configured = self._read_config(os.path.join(os.path.dirname(self.path), "tokenizer_config.json"))
        ids = {}
        for kind, candidates in self._COMMON_TOKENS.items():
            token = configured.get(kind)
            if token is not None:
                ids[kind] = self._tok.token_to_id(token)
                if ids[kind] is None:
                    raise ValueError(f"tokenizer_config.json next to {self.path}: {kind}_token {token!r} is not in the vocabulary")
            else:
                ids[kind] = next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)
        self.bos_id, self.eos_id, self._pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.chat_template = load_chat_template(os.path.dirname(os.path.abspath(self.path)))

    @staticmethod
    def _read_config(config_path: str) -> dict:
        """``{"bos"|"eos"|"pad": token string}`` for the tokens the config names."""
        if not os.path.isfile(config_path):
            return {}
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        tokens = {}
        for kind in ("bos", "eos", "pad"):
            value = config.get(f"{kind}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                tokens[kind] = value
        return tokens

    def text_to_ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog: 0123456789, ?!"


def tokenizer_fingerprint(tokenizer) -> tuple[int, list[int]]:
    """``(vocab_size, ids of TOKENIZER_PROBE)``: equal for two tokenizers that agree (a critic
    server and its actor, a teacher's top-k logits file and its student)."""
    return int(tokenizer.vocab_size), list(tokenizer.text_to_ids(TOKENIZER_PROBE))


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a SentencePiece ``.model`` file, a ``tokenizer.json`` file, or a
    directory containing ``tokenizer.json`` (preferred) or ``tokenizer.model``."""
    path = str(path)
    if os.path.isdir(path):
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return cls(os.path.join(path, name))
    elif os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        if path.endswith(".json"):
            return HFTokenizer(path)
        raise ValueError(f"tokenizer {path}: unknown file type; expected a SentencePiece .model file or a tokenizer.json")
    raise FileNotFoundError(
        f"tokenizer not found at {path}: expected a SentencePiece .model file, a tokenizer.json, "
        "or a directory containing tokenizer.json or tokenizer.model"
    )


def _none_if_negative(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


# The files a tokenizer is made of (Hugging Face and SentencePiece), never model weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def copy_tokenizer_files(source, dest) -> None:
    """Copy the tokenizer at ``source`` (a directory, a ``tokenizer.json`` or a SentencePiece
    ``.model`` file) into directory ``dest`` as a directory :func:`load_tokenizer` reads.

    Only tokenizer files are copied (:data:`TOKENIZER_FILES`, found in the directory or next
    to the file), so a Hugging Face model directory gives its tokenizer, not its weights.
    """
    src, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    folder = src
    if src.is_file():
        shutil.copy2(src, dest / ("tokenizer.model" if src.suffix == ".model" else "tokenizer.json"))
        folder = src.parent
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and not (dest / name).exists():
            shutil.copy2(folder / name, dest / name)
