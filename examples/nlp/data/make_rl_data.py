"""Generate the bundled RL prompts and preference pairs: tasks with a known answer
(deterministic).

Writes into ``--output-dir`` (default ``data/quickstart``), in the prompt format the quickstart
SFT data trains (``"{input}\\n\\n"``):

- ``rl_train.jsonl`` / ``rl_val.jsonl``: one ``{"text", "answer", "task"}`` line per prompt (the
  reward functions of :mod:`nemo_aligner.rewards.quickstart` compare a response with ``answer``);
- ``count_preference_train.jsonl`` / ``count_preference_val.jsonl``: preference pairs on the same
  task, ``{"prompt", "chosen_response", "rejected_response", "chosen_reward", "rejected_reward"}``
  with the right answer chosen and a wrong one (off by one or two) rejected, for the reward model
  and DPO stages of ``examples/pipeline/quickstart.sh``.

    python examples/nlp/data/make_rl_data.py --tasks count repeat
"""

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_quickstart_data import make_task  # noqa: E402

from nemo_aligner.data.datasets import write_jsonl  # noqa: E402

TASKS = {"Count": "count", "Repeat": "repeat", "Uppercase": "upper", "Reverse": "reverse", "Sort": "sort", "Add": "add"}


def make_prompts(n: int, tasks: set[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        question, answer = make_task(rng)
        task = TASKS[question.split()[0].rstrip(":")]
        if task in tasks:
            rows.append({"text": f"{question}\n\n", "answer": answer, "task": task})
    return rows


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """A preference pair per prompt: the answer chosen, a wrong number near it rejected."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        right = int(row["answer"])
        wrong = rng.choice([n for n in (right - 2, right - 1, right + 1, right + 2) if n >= 1])
        pairs.append({"prompt": row["text"], "chosen_response": str(right), "rejected_response": str(wrong),
                      "chosen_reward": 1.0, "rejected_reward": 0.0})
    return pairs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/quickstart")
    parser.add_argument("--tasks", nargs="+", default=["count", "repeat"], choices=sorted(TASKS.values()))
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--validation", type=int, default=128)
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    tasks = set(args.tasks)
    train, val = make_prompts(args.train, tasks, args.seed), make_prompts(args.validation, tasks, args.seed + 1)
    write_jsonl(os.path.join(args.output_dir, "rl_train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "rl_val.jsonl"), val)
    if tasks == {"count"}:
        write_jsonl(os.path.join(args.output_dir, "count_preference_train.jsonl"), make_pairs(train, args.seed + 2))
        write_jsonl(os.path.join(args.output_dir, "count_preference_val.jsonl"), make_pairs(val, args.seed + 3))
    print(f"wrote {args.train} train and {args.validation} validation prompts ({', '.join(sorted(tasks))}) to {args.output_dir}")


if __name__ == "__main__":
    main()
