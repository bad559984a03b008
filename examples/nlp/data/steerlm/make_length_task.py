"""Generate the bundled SteerLM task, where the attribute can be checked: ``verbosity`` is the
reply's length band (deterministic, seeded).

A user asks for words of a topic ("Name some fruits"); the reply lists words of that topic, and
its ``verbosity`` v (0-4) says how many: 2v + 1 or 2v + 2. Writes into ``--output-dir`` (default
``data/quickstart``):

- ``steerlm_train.jsonl`` / ``steerlm_val.jsonl``: NeMo's SteerLM conversations
  (``{"system", "mask", "type", "conversations"}``), VALUE_TO_TEXT (the label conditions the
  reply) and a share of TEXT_TO_VALUE (the model learns to rate a reply's verbosity);
- ``steerlm_prompts.jsonl``: held-out user messages (``{"text", "topic"}``) for
  ``generate.py steerlm.attributes={verbosity: v}``.

    python examples/nlp/data/steerlm/make_length_task.py
"""

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", ".."))
from nemo_aligner.data.datasets import write_jsonl  # noqa: E402

TOPICS = {
    "fruits": "apple banana cherry grape lemon mango peach plum".split(),
    "colors": "red blue green black white gold".split(),
    "animals": "cat dog fox owl bee ant cow pig".split(),
    "sky words": "sun moon star rain snow wind".split(),
}
ASKS = ("Name some {topic}", "List {topic}", "Give me {topic}", "Tell me {topic}")
LEVELS = range(5)


def band(verbosity: int) -> tuple[int, int]:
    """The reply lengths (in words) of a verbosity level."""
    return 2 * verbosity + 1, 2 * verbosity + 2


def reply(rng: random.Random, topic: str, verbosity: int) -> str:
    return " ".join(rng.choices(TOPICS[topic], k=rng.randint(*band(verbosity))))


def conversation(rng: random.Random, text_to_value_share: float) -> dict:
    topic = rng.choice(sorted(TOPICS))
    verbosity = rng.choice(LEVELS)
    kind = "TEXT_TO_VALUE" if rng.random() < text_to_value_share else "VALUE_TO_TEXT"
    return {
        "system": "", "mask": "User", "type": kind,
        "conversations": [
            {"from": "User", "value": rng.choice(ASKS).format(topic=topic), "label": None},
            {"from": "Assistant", "value": reply(rng, topic, verbosity), "label": f"verbosity:{verbosity}"},
        ],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="data/quickstart")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--text-to-value-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    out = args.output_dir
    write_jsonl(os.path.join(out, "steerlm_train.jsonl"),
                [conversation(rng, args.text_to_value_share) for _ in range(args.train)])
    write_jsonl(os.path.join(out, "steerlm_val.jsonl"),
                [conversation(rng, args.text_to_value_share) for _ in range(args.val)])
    prompts = []
    for topic in sorted(TOPICS):
        for ask in ASKS:
            prompts.append({"text": ask.format(topic=topic), "topic": topic})
    write_jsonl(os.path.join(out, "steerlm_prompts.jsonl"), prompts)
    print(f"wrote {args.train} + {args.val} conversations and {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
