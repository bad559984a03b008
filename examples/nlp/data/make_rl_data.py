"""Generate the bundled RL prompts: tasks with a known answer (deterministic).

Writes ``rl_train.jsonl`` and ``rl_val.jsonl`` into ``--output-dir`` (default
``data/quickstart``), one ``{"text", "answer", "task"}`` line per prompt, in the prompt format
the quickstart SFT data trains (``"{input}\\n\\n"``). The reward functions of
:mod:`nemo_aligner.rewards.quickstart` compare a response with ``answer``.

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
    write_jsonl(os.path.join(args.output_dir, "rl_train.jsonl"), make_prompts(args.train, tasks, args.seed))
    write_jsonl(os.path.join(args.output_dir, "rl_val.jsonl"), make_prompts(args.validation, tasks, args.seed + 1))
    print(f"wrote {args.train} train and {args.validation} validation prompts ({', '.join(sorted(tasks))}) to {args.output_dir}")


if __name__ == "__main__":
    main()
