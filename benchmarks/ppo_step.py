"""One PPO step, split by phase, with the critic overlapped against the same run without overlap.

Runs ``examples/nlp/gpt/launch_ppo.py`` (critic server combined with the reward model, and the
actor) ``--repeats`` times per mode, interleaved: ``trainer.ppo.overlap_critic=true`` (critic
requests go out as micro-batches are generated; critic_train runs while the actor trains) and
``false`` (each call awaited as soon as it is made). From each run's ``metrics.jsonl`` (the
steps after the first, which pays for warm-up) it reports the mean step time and the mean per
step of ``timers/{generate, logprobs, init_logprobs, critic_wait, critic_train_wait, train,
critic_save}``, the refit (inside ``generate``), and ``token_mult_prob_error``; then the ratio
of step times, no overlap / overlap.

Threads: ``--threads N`` sets ``OMP_NUM_THREADS`` for each process. With 1 on a 2-core machine
the actor and the critic each have a core of their own (the setting the overlap is for: servers
on their own allocation); with 2 they contend for the same cores, and the figure is reported as
it is. The tiny policy and reward model are made once (``--work``) unless given.

    PYTHONPATH=. python benchmarks/ppo_step.py --threads 1
    PYTHONPATH=. python benchmarks/ppo_step.py --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "examples/nlp/gpt"
ARCH = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.encoder_seq_length=64"]
TIMERS = ("generate", "logprobs", "init_logprobs", "critic_wait", "critic_train_wait", "train", "critic_save")


def sh(cmd, env):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return proc


def models(work: Path, env) -> tuple[Path, Path]:
    sft, rm = work / "sft" / "final_model", work / "rm" / "final_model"
    if not sft.exists():
        sh([sys.executable, GPT / "train_gpt_sft.py", *ARCH, "model.micro_batch_size=16", "model.global_batch_size=32",
            "trainer.sft.max_epochs=2", "trainer.sft.val_check_interval=0", f"exp_manager.explicit_log_dir={work / 'sft'}",
            "exp_manager.resume_if_exists=false", "exp_manager.overwrite=true"], env)
    if not rm.exists():
        sh([sys.executable, GPT / "train_reward_model.py", *ARCH, f"pretrained_checkpoint.restore_from_path={sft}",
            f"exp_manager.explicit_log_dir={work / 'rm'}", "trainer.rm.max_epochs=1", "trainer.rm.val_check_interval=0",
            "model.data.data_prefix.train=data/quickstart/count_preference_train.jsonl",
            "model.data.data_prefix.validation=data/quickstart/count_preference_val.jsonl",
            "exp_manager.resume_if_exists=false", "exp_manager.overwrite=true"], env)
    return sft, rm


def one_run(work, sft, rm, overlap: bool, args, env) -> dict:
    log_dir = work / f"ppo_{'on' if overlap else 'off'}"
    sh([sys.executable, GPT / "launch_ppo.py", "--log-dir", str(log_dir),
        f"critic.pretrained_checkpoint.restore_from_path={rm}", "critic.exp_manager.resume_if_exists=false",
        "critic.exp_manager.overwrite=true", f"critic.model.global_batch_size={args.samples // 2}",
        f"critic.model.micro_batch_size={args.samples // 2}", f"critic.trainer.ppo.inference_micro_batch_size={args.mbs}",
        f"actor.pretrained_checkpoint.restore_from_path={sft}", f"actor.trainer.ppo.max_steps={args.steps}",
        "actor.trainer.ppo.val_check_interval=0", "actor.exp_manager.resume_if_exists=false",
        "actor.exp_manager.overwrite=true", f"actor.trainer.ppo.overlap_critic={str(overlap).lower()}",
        f"actor.model.ppo.num_rollout_samples={args.samples}", f"actor.model.ppo.rollout_micro_batch_size={args.mbs}",
        f"actor.model.ppo.forward_micro_batch_size={args.samples}", f"actor.model.global_batch_size={args.samples // 2}",
        f"actor.model.micro_batch_size={args.samples // 2}", f"actor.model.ppo.length_params.max_length={args.new_tokens}",
        "actor.model.ppo.length_params.min_length=" + str(args.new_tokens)], env)
    rows = [json.loads(line) for line in open(log_dir / "actor" / "metrics.jsonl")]
    steps = [r for r in rows if "train_optim/loss" in r][1:]  # the first step pays for warm-up
    out = {"step_time": statistics.mean(r["step_time"] for r in steps)}
    for name in TIMERS:
        out[name] = statistics.mean(r.get(f"timers/{name}", 0.0) for r in steps)
    out["token_mult_prob_error"] = max(r["train_rollouts/token_mult_prob_error"] for r in steps)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/ppo_step_bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=64, help="num_rollout_samples")
    parser.add_argument("--mbs", type=int, default=16, help="rollout_micro_batch_size (and the critic's inference one)")
    parser.add_argument("--new-tokens", type=int, default=16, help="response length (min = max, so every step is alike)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    sft, rm = models(work, env)
    results = {True: [], False: []}
    for _ in range(args.repeats):
        for overlap in (True, False):
            results[overlap].append(one_run(work, sft, rm, overlap, args, env))
    print(f"PPO step, {args.samples} samples x {args.new_tokens} new tokens, OMP_NUM_THREADS={args.threads} per process, "
          f"{os.cpu_count()} cores; mean over steps 2..{args.steps}, median of {args.repeats} runs (seconds)")
    print(f"{'':>20} {'overlap':>10} {'no overlap':>11}")
    med = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in results.items()}
    for key in ("step_time", *TIMERS, "token_mult_prob_error"):
        print(f"{key:>20} {med[True][key]:>10.4f} {med[False][key]:>11.4f}")
    print(f"no overlap / overlap step time: x{med[False]['step_time'] / med[True]['step_time']:.2f}")


if __name__ == "__main__":
    main()
