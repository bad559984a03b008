"""Generate the bundled synthetic preference data (deterministic).

A preference task with a clear rule, small enough for a tiny model to learn on CPU in a
few dozen steps. Every prompt is an instruction over words from the quickstart vocabulary,
and the chosen response follows it while the rejected one does not:

- ``Uppercase: w1 w2 ...``  chosen ``W1 W2 ...``, rejected ``w1 w2 ...`` (left as is);
- ``Repeat twice: w1 w2``   chosen ``w1 w2 w1 w2``, rejected ``w1 w2`` (said once).

Writes into ``--output-dir`` (default ``data/quickstart``):

- ``preference_train.jsonl`` / ``preference_val.jsonl``: ``{"prompt", "chosen_response",
  "rejected_response", "chosen_reward", "rejected_reward"}`` (rewards 1 / 0, for the RPO
  losses); prompts end with the default template's ``"\\n\\n"``;
- ``kto_train.jsonl`` / ``kto_val.jsonl``: the same pairs split into unpaired
  ``{"prompt", "response", "preference"}`` lines (one per response, in a shuffled order);
- ``rm_regression_train.jsonl``: ``{"text", "label": [follows_rule, num_words]}`` lines
  (the second attribute missing, -100, on a quarter of them).

Validation prompts never appear in the training file.

    python examples/nlp/data/make_preference_data.py
"""

import argparse
import os
import random

from nemo_aligner.data.datasets import write_jsonl

WORDS = (
    "apple banana cherry grape lemon mango peach plum "
    "red blue green black white gold "
    "cat dog fox owl bee ant cow pig "
    "sun moon star rain snow wind tree rock"
).split()


def make_pair(rng: random.Random) -> dict:
    """One preference pair; the chosen response follows the instruction."""
    words = rng.sample(WORDS, k=rng.randint(2, 4))
    if rng.random() < 0.5:
        text = " ".join(words)
        prompt, chosen, rejected = f"Uppercase: {text}", text.upper(), text
    else:
        text = " ".join(words[:2])
        prompt, chosen, rejected = f"Repeat twice: {text}", f"{text} {text}", text
    return {"prompt": prompt + "\n\n", "chosen_response": chosen, "rejected_response": rejected,
            "chosen_reward": 1.0, "rejected_reward": 0.0}


def make_pairs(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` pairs; no validation prompt occurs in training."""
    rng = random.Random(seed)
    val = [make_pair(rng) for _ in range(n_val)]
    val_prompts = {p["prompt"] for p in val}
    train = []
    while len(train) < n_train:
        pair = make_pair(rng)
        if pair["prompt"] not in val_prompts:
            train.append(pair)
    return train, val


def to_kto(pairs: list[dict], rng: random.Random) -> list[dict]:
    lines = []
    for p in pairs:
        lines.append({"prompt": p["prompt"], "response": p["chosen_response"], "preference": True})
        lines.append({"prompt": p["prompt"], "response": p["rejected_response"], "preference": False})
    rng.shuffle(lines)
    return lines


def to_regression(pairs: list[dict], rng: random.Random) -> list[dict]:
    lines = []
    for p in pairs:
        for response, follows in ((p["chosen_response"], 1.0), (p["rejected_response"], 0.0)):
            count = float(len(response.split())) if rng.random() >= 0.25 else -100.0
            lines.append({"text": p["prompt"] + response, "label": [follows, count]})
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/quickstart")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    train, val = make_pairs(args.num_train, args.num_val, args.seed)
    rng = random.Random(args.seed + 1)
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    write_jsonl(out("preference_train.jsonl"), train)
    write_jsonl(out("preference_val.jsonl"), val)
    write_jsonl(out("kto_train.jsonl"), to_kto(train, rng))
    write_jsonl(out("kto_val.jsonl"), to_kto(val, rng))
    write_jsonl(out("rm_regression_train.jsonl"), to_regression(train, rng))
    print(f"wrote {len(train)} train and {len(val)} validation pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
