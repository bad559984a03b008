"""Held-out score of one pipeline stage, printed and saved as JSON.

    python examples/pipeline/evaluate.py answers --model results/quickstart/dpo/final_model \
        --prompts data/quickstart/preference_val.jsonl --prompt-field prompt --answer-field chosen_response \
        --out results/quickstart/scores/dpo.json
    python examples/pipeline/evaluate.py pairs --scored results/quickstart/rm_val_scored.jsonl --out ...

``answers``: greedy responses (``examples/nlp/gpt/generate.py``) to every prompt, scored as the
fraction that equal the expected answer exactly. ``pairs``: the fraction of preference pairs a
reward model scored (``score_reward_model.py``) with the chosen response above the rejected one.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def answers(args) -> dict:
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        prompts, responses = Path(tmp) / "prompts.jsonl", Path(tmp) / "responses.jsonl"
        prompts.write_text("".join(json.dumps({"text": r[args.prompt_field]}) + "\n" for r in rows))
        cmd = [sys.executable, str(ROOT / "examples/nlp/gpt/generate.py"),
               f"pretrained_checkpoint.restore_from_path={args.model}", f"input_file={prompts}",
               f"output_file={responses}", "sampling.greedy=true", f"sampling.max_new_tokens={args.max_new_tokens}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"generation failed:\n{proc.stderr[-3000:]}")
        outputs = [json.loads(line)["response"] for line in responses.read_text().splitlines()]
    correct = [out.strip() == str(r[args.answer_field]).strip() for r, out in zip(rows, outputs)]
    examples = [{"prompt": r[args.prompt_field], "response": o, "answer": r[args.answer_field]}
                for r, o in list(zip(rows, outputs))[:3]]
    return {"score": sum(correct) / len(correct), "n": len(correct), "metric": "exact answer", "examples": examples}


def pairs(args) -> dict:
    rows = [json.loads(line) for line in Path(args.scored).read_text().splitlines() if line.strip()]
    right = [float(r["reward_chosen"]) > float(r["reward_rejected"]) for r in rows]
    return {"score": sum(right) / len(right), "n": len(right), "metric": "chosen ranked above rejected"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("answers")
    a.add_argument("--model", required=True)
    a.add_argument("--prompts", required=True)
    a.add_argument("--prompt-field", default="text")
    a.add_argument("--answer-field", default="answer")
    a.add_argument("--max-new-tokens", type=int, default=16)
    a.add_argument("--limit", type=int, default=0, help="score only the first N prompts (0: all)")
    p = sub.add_parser("pairs")
    p.add_argument("--scored", required=True)
    for s in (a, p):
        s.add_argument("--name", required=True, help="the stage, as the report names it")
        s.add_argument("--out", required=True)
    args = parser.parse_args()
    result = answers(args) if args.kind == "answers" else pairs(args)
    result["stage"] = args.name
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out score of {args.name}: {result['score']:.3f} ({result['metric']}, {result['n']} examples)")


if __name__ == "__main__":
    main()
