"""GRPO, whole process: ours (``train_gpt_grpo.py``) against TRL's ``GRPOTrainer`` on CPU.

The same footing on both sides:

- the same random tiny Llama (one Hugging Face directory, saved once; ours imports it through
  ``pretrained_checkpoint.restore_from_path``) and its tokenizer (the quickstart BPE);
- the same prompts (``data/quickstart/rl_train.jsonl``, the counting task), ``--prompts``
  prompts per step, ``--generations`` completions each (one optimizer step over all of them per
  step), at most ``--max-new-tokens`` new tokens, temperature 1;
- the same rule-based reward (``nemo_aligner.rewards.quickstart.exact_match``, loaded from its
  file on the TRL side), the same learning rate (constant), KL weight ``--beta`` to the initial
  policy, fp32, and ``--steps`` steps;
- otherwise each side's defaults: ours as ``conf/gpt_grpo.yaml`` ships (micro-batch 16, the
  KV-cached engine on the training weights); TRL as ``GRPOConfig`` comes (``transformers``'
  ``generate``, its default loss).

TRL needs ``datasets``, whose current ``pyarrow`` needs numpy >= 2, while PyTriton (our
``[serve]``/``[test]`` extras) pins numpy < 2, so TRL runs from its own virtual environment::

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl
    python benchmarks/grpo_vs_trl.py --trl-python .venv-trl/bin/python

Each side is one process, timed from start to exit (imports, model load, every step, exit),
``--repeats`` times, interleaved; the report gives each run's wall time, completions per
second (``steps x prompts x generations / wall``), the median, and ours / TRL.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "data/quickstart/rl_train.jsonl"


def make_model_dir(out: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)


# ------------------------------------------------------------------------------ TRL side
def run_trl(args) -> None:
    """Runs inside TRL's environment: imports nothing of ours but the reward function's file."""
    import importlib.util

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("quickstart_rewards", ROOT / "nemo_aligner/rewards/quickstart.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)

    def exact_match(prompts, completions, answer, **kwargs):
        return rewards.exact_match(prompts, completions, [{"answer": a} for a in answer])

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
    data = load_dataset("json", data_files=str(PROMPTS), split="train").rename_column("text", "prompt")
    # Matched on both sides in every mode; "equal" also matches the batch and the KL weight,
    # "defaults" leaves them at GRPOConfig's defaults (8 completions per step, beta 0).
    matched = dict(num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0,
                   learning_rate=args.lr, lr_scheduler_type="constant", max_steps=args.steps)
    if args.footing == "equal":
        matched.update(per_device_train_batch_size=args.prompts * args.generations, beta=args.beta)
    config = GRPOConfig(
        output_dir=args.work + "/trl", weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True,
        bf16=False, seed=1234, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, **matched,
    )
    trainer = GRPOTrainer(model=model, args=config, train_dataset=data, reward_funcs=exact_match,
                          processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print("RESULT " + json.dumps({"train_seconds": time.perf_counter() - start, "rewards": rewards_logged,
                                  "completions": args.steps * config.per_device_train_batch_size,
                                  "beta": config.beta}), flush=True)


# ------------------------------------------------------------------------------ our side
def ours_cmd(args) -> list[str]:
    log_dir = tempfile.mkdtemp(prefix="ours-", dir=args.work)
    return [
        sys.executable, str(ROOT / "examples/nlp/gpt/train_gpt_grpo.py"),
        f"pretrained_checkpoint.restore_from_path={args.model_dir}", "model.tokenizer.model=null",
        f"model.data.data_prefix.train={PROMPTS}", "model.data.data_prefix.validation=null", f"model.encoder_seq_length={args.context}",
        f"model.grpo.num_prompts_per_step={args.prompts}", f"model.grpo.num_generations_per_prompt={args.generations}",
        f"model.global_batch_size={args.prompts * args.generations}",
        f"model.grpo.length_params.max_length={args.max_new_tokens}", "model.grpo.sampling_params.temperature=1.0",
        f"trainer.grpo.initial_policy_kl_penalty={args.beta}", f"model.optim.lr={args.lr}",
        f"model.optim.sched.min_lr={args.lr}", f"trainer.grpo.max_steps={args.steps}",
        "trainer.grpo.val_check_interval=0", "trainer.grpo.save_interval=0",
        "exp_manager.checkpoint_callback_params.save_final_model=false", f"exp_manager.explicit_log_dir={log_dir}",
    ], Path(log_dir)


def ours_details(log_dir: Path) -> dict:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train_rollouts/rewards" in r]
    return {"train_seconds": sum(r["step_time"] for r in rows), "rewards": [r["train_rollouts/rewards"] for r in rows],
            "token_mult_prob_error": rows[-1].get("train_rollouts/token_mult_prob_error")}


# ------------------------------------------------------------------------------ driver
def timed(cmd, env) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (the group size)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--context", type=int, default=None, help="our model.encoder_seq_length (default: the "
                        "model's max_position_embeddings)")
    parser.add_argument("--beta", type=float, default=0.01, help="KL weight to the initial policy (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--footing", choices=("equal", "defaults"), default="equal",
                        help="equal: TRL gets our batch (prompts x generations per step) and beta; defaults: TRL "
                        "keeps GRPOConfig's (8 completions per step, beta 0), ours keeps conf/gpt_grpo.yaml's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", str(ROOT / ".venv-trl/bin/python")),
                        help="the Python of a virtual environment with trl installed")
    parser.add_argument("--model-dir", help="a Hugging Face Llama directory (with its tokenizer) to start both sides "
                        "from; default: a random tiny Llama made here")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "trl":
        run_trl(args)
        return
    if not Path(args.trl_python).exists():
        raise SystemExit(f"--trl-python {args.trl_python} does not exist; see this file's docstring for the TRL venv")

    work = tempfile.mkdtemp(prefix="grpo_vs_trl_")
    if args.model_dir is None:
        args.model_dir = str(Path(work) / "tiny-llama")
        make_model_dir(Path(args.model_dir), args.seed)
    args.work = work
    if args.context is None:
        args.context = json.loads((Path(args.model_dir) / "config.json").read_text())["max_position_embeddings"]
    completions = args.steps * args.prompts * args.generations
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    print(f"model: {args.model_dir} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']}); {args.steps} steps of {args.prompts} "
          f"prompts x {args.generations} completions (<= {args.max_new_tokens} tokens), lr {args.lr}, beta {args.beta}; "
          f"{os.cpu_count()} cpus")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {"ours": [], "trl": []}
    for _ in range(args.repeats):  # interleaved: machine load hits both sides alike
        cmd, log_dir = ours_cmd(args)
        seconds, proc = timed(cmd, env)
        if proc.returncode != 0:
            raise SystemExit(f"ours failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        runs["ours"].append({"wall_seconds": seconds, "completions": completions, "beta": args.beta, **ours_details(log_dir)})
        trl_cmd = [args.trl_python, __file__, "--side", "trl", "--model-dir", args.model_dir, "--work", work,
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations),
                   "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--beta", str(args.beta),
                   "--footing", args.footing]
        seconds, proc = timed(trl_cmd, dict(os.environ))
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"trl failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        runs["trl"].append({"wall_seconds": seconds, **json.loads(lines[-1][len("RESULT "):])})
        print("  " + ", ".join(f"{side} {r[-1]['wall_seconds']:.1f} s ({r[-1]['completions'] / r[-1]['wall_seconds']:.1f} "
                               "completions/s)" for side, r in runs.items()), flush=True)

    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    summary = {}
    for side, rs in runs.items():
        wall = median([r["wall_seconds"] for r in rs])
        train = median([r["train_seconds"] for r in rs])
        n = rs[0]["completions"]
        summary[side] = {"wall_seconds": wall, "completions": n, "completions_per_s": n / wall, "train_seconds": train,
                         "train_completions_per_s": n / train, "beta": rs[0]["beta"],
                         "all_wall_seconds": [round(r["wall_seconds"], 2) for r in rs],
                         "first_rewards": rs[0]["rewards"][:3], "last_rewards": rs[0]["rewards"][-3:]}
    print(f"\nmedian of {args.repeats} runs, whole process ({args.footing} footing, {args.steps} steps each)")
    print(f"{'side':<6} {'completions':>11} {'beta':>5} {'wall s':>8} {'completions/s':>14} {'train-loop s':>13} "
          f"{'loop completions/s':>19}")
    for side, s in summary.items():
        print(f"{side:<6} {s['completions']:>11} {s['beta']:>5} {s['wall_seconds']:>8.1f} {s['completions_per_s']:>14.1f} "
              f"{s['train_seconds']:>13.1f} {s['train_completions_per_s']:>19.1f}")
    ratio = summary["ours"]["completions_per_s"] / summary["trl"]["completions_per_s"]
    loop_ratio = summary["ours"]["train_completions_per_s"] / summary["trl"]["train_completions_per_s"]
    print(f"ours / trl: x{ratio:.2f} completions/s (whole process), x{loop_ratio:.2f} (training loop only)")
    print("RESULTS " + json.dumps(summary))


if __name__ == "__main__":
    main()
