"""Generate the bundled quickstart SFT data and its tokenizer (deterministic).

Writes, into ``--output-dir`` (default ``data/quickstart``):

- ``sft_train.jsonl``: 2000 ``{"input", "output"}`` lines plus 200 chat lines mixed in
  (half ShareGPT ``from``/``value``, half OpenAI ``role``/``content``);
- ``sft_val.jsonl``: 200 ``{"input", "output"}`` lines;
- ``tokenizer.json`` + ``tokenizer_config.json``: a byte-level BPE (vocabulary 512) trained
  on that text, with special tokens ``<pad>``, ``<s>``, ``</s>`` and the chat markers.

The tasks (reverse, sort, uppercase, count, add, repeat) over a small word list have exact
answers, so a tiny model visibly learns them.

    python examples/nlp/data/make_quickstart_data.py   # from the repository root, nemo_aligner importable
"""

import argparse
import json
import os
import random

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemo_aligner.data.datasets import write_jsonl
from nemo_aligner.data.templates import CHAT_MARKERS, render_chat_segments

WORDS = (
    "apple banana cherry grape lemon mango peach plum "
    "red blue green black white gold "
    "cat dog fox owl bee ant cow pig "
    "sun moon star rain snow wind tree rock"
).split()
SYSTEM_PROMPT = "You are a precise assistant."
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", *CHAT_MARKERS]
VOCAB_SIZE = 512


def make_task(rng: random.Random) -> tuple[str, str]:
    """One ``(input, output)`` pair from a random task."""
    words = rng.choices(WORDS, k=rng.randint(2, 5))
    text = " ".join(words)
    task = rng.choice(("reverse", "sort", "upper", "count", "add", "repeat"))
    if task == "reverse":
        return f"Reverse the words: {text}", " ".join(reversed(words))
    if task == "sort":
        return f"Sort the words: {text}", " ".join(sorted(words))
    if task == "upper":
        return f"Uppercase: {text}", text.upper()
    if task == "count":
        return f"Count the words: {text}", str(len(words))
    if task == "repeat":
        return f"Repeat twice: {words[0]}", f"{words[0]} {words[0]}"
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Add {a} and {b}", str(a + b)


def make_chat(rng: random.Random, openai_keys: bool) -> dict:
    """A one- or two-exchange chat sample over the same tasks."""
    turns = []
    for _ in range(rng.randint(1, 2)):
        question, answer = make_task(rng)
        turns += [("user", question), ("assistant", answer)]
    if openai_keys:
        return {"system": SYSTEM_PROMPT, "conversations": [{"role": r, "content": t} for r, t in turns]}
    names = {"user": "User", "assistant": "Assistant"}
    return {"system": SYSTEM_PROMPT, "conversations": [{"from": names[r], "value": t} for r, t in turns]}


def make_samples(seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` samples; the same for the same seed."""
    rng = random.Random(seed)
    train = [dict(zip(("input", "output"), make_task(rng))) for _ in range(2000)]
    for i in range(200):
        train.insert(rng.randrange(len(train) + 1), make_chat(rng, openai_keys=i % 2 == 1))
    val = [dict(zip(("input", "output"), make_task(rng))) for _ in range(200)]
    return train, val


def sample_text(sample: dict) -> str:
    """The full text of a sample as the SFT dataset renders it (default prompt template)."""
    if "conversations" in sample:
        return "".join(text for text, _ in render_chat_segments(sample))
    return f"{sample['input']}\n\n{sample['output']}"


def train_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    """A byte-level BPE with :data:`SPECIAL_TOKENS` (ids 0..) trained on ``texts``."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/quickstart")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    train, val = make_samples(args.seed)
    write_jsonl(os.path.join(args.output_dir, "sft_train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "sft_val.jsonl"), val)
    tokenizer = train_tokenizer([sample_text(s) for s in train + val])
    tokenizer.save(os.path.join(args.output_dir, "tokenizer.json"))
    with open(os.path.join(args.output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f, indent=2)
        f.write("\n")
    print(f"wrote {len(train)} train and {len(val)} validation samples and a {tokenizer.get_vocab_size()}-token tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
