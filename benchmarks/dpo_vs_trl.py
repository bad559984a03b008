"""DPO throughput and memory: ours against TRL's ``DPOTrainer``, side by side on CPU.

Both sides train the same random tiny Llama (saved once with ``transformers``'
``save_pretrained``; ours imports that directory through ``pretrained_checkpoint.
restore_from_path``), on the same preference pairs (prompt and response lengths drawn from a
long-tailed distribution, as in real preference data), for one epoch, fp32, beta 0.1, with
the same optimizer settings. TRL runs in float32 without gradient checkpointing, like ours
(``--trl-defaults`` keeps TRL's bf16 autocast and checkpointing), otherwise as it comes: a
reference forward every step, chosen and rejected padded to the longest sequence of the
batch, ``--batch-size`` pairs per step. Ours runs twice: unpacked with the same batch (``global_batch_size`` pairs), and
packed (``--pack-size`` tokens per pack, one pack per step, each pair's prompt computed
once: ``model.data.packing.share_prompt``), both with the reference log-probs precomputed
once before training; that pass is included in our time. ``ours-packed-unshared`` (not run
by default) packs without sharing prompts.

Each side runs in its own process, so peak memory is per side: ``peak_rss`` is the process's
peak resident set size (``getrusage``), ``peak_rss_growth`` that minus the RSS once the
libraries are imported (what building and training the model added: weights, the reference
copy or log-probs, optimizer state, activations, data).

    python benchmarks/dpo_vs_trl.py                # prints a table and the ratios
    python benchmarks/dpo_vs_trl.py --pairs 256 --batch-size 8 --max-length 256 --repeats 5

Sides run one after another, interleaved, ``--repeats`` times each; throughput is the median
run (CPU timings on a shared machine are noisy), peak memory the largest.

Needs the ``bench`` extra (``pip install -e ".[bench]"``, i.e. ``trl``).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "apple banana cherry grape lemon mango peach plum red blue green black white gold cat dog fox owl "
    "bee ant cow pig sun moon star rain snow wind tree rock the a of and to in is it that for on with"
).split()


# ------------------------------------------------------------------------------ fixtures
def make_model_dir(out: Path, vocab_size_from_tokenizer: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size_from_tokenizer, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)


def text_of_tokens(tok, rng, n_tokens: int) -> str:
    words = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def long_tailed(rng, median: float, cap: int) -> int:
    """Lognormal lengths (sigma 0.8), as real prompt/response lengths are; 4 <= n <= cap."""
    return max(4, min(cap, int(rng.lognormvariate(0.0, 0.8) * median)))


def make_pairs(tok, n: int, max_length: int, seed: int) -> list[dict]:
    """Pairs whose prompt + response + EOS fits ``max_length`` tokens (counted as both sides
    tokenize them: prompt and response separately)."""
    rng = random.Random(seed)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    pairs = []
    while len(pairs) < n:
        p = long_tailed(rng, max_length * 0.15, max_length // 2)
        c = long_tailed(rng, max_length * 0.25, max_length - p - 8)
        r = long_tailed(rng, max_length * 0.25, max_length - p - 8)
        pair = {"prompt": text_of_tokens(tok, rng, p) + "\n\n", "chosen_response": text_of_tokens(tok, rng, c),
                "rejected_response": text_of_tokens(tok, rng, r)}
        if max(count(pair["prompt"]) + count(pair[k]) + 1 for k in ("chosen_response", "rejected_response")) <= max_length:
            pairs.append(pair)
    return pairs


# ------------------------------------------------------------------------------ measuring
def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def report(side, seconds, cpu_seconds, pairs, steps, baseline_mib, extra=None):
    peak = peak_rss_mib()
    print("RESULT " + json.dumps({
        "side": side, "seconds": seconds, "pairs": pairs, "steps": steps, "pairs_per_s": pairs / seconds,
        "cpu_seconds": cpu_seconds, "pairs_per_cpu_s": pairs / cpu_seconds,
        "peak_rss_mib": peak, "peak_rss_growth_mib": peak - baseline_mib, **(extra or {}),
    }), flush=True)


# ------------------------------------------------------------------------------ sides
def run_trl(args) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    baseline = rss_mib()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
    data = load_dataset("json", data_files=args.data, split="train")
    data = data.rename_columns({"chosen_response": "chosen", "rejected_response": "rejected"})
    config = DPOConfig(
        output_dir=args.work + "/trl", per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="constant", beta=0.1, max_length=args.max_length,
        max_grad_norm=1.0, weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True,
        logging_steps=10**9, dataloader_num_workers=0, seed=1234, disable_tqdm=True,
        # Equal footing with ours: float32 and no activation recomputation. TRL's defaults
        # (bf16 autocast, gradient checkpointing) are far slower on CPUs without bf16 units.
        bf16=args.trl_defaults, gradient_checkpointing=args.trl_defaults,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    report("trl", seconds, cpu_seconds, len(data), out.global_step, baseline, {"train_loss": out.training_loss})


def run_ours(args, packed: bool, share_prompt: bool = True) -> None:
    from omegaconf import OmegaConf

    import nemo_aligner.algorithms.dpo as dpo

    baseline = rss_mib()
    timed = {"precompute": 0.0, "precompute_cpu": 0.0}
    original = dpo.precompute_reference_logps

    def precompute(*a, **kw):  # our reference pass is part of the training cost
        start, cpu_start = time.perf_counter(), time.process_time()
        original(*a, **kw)
        timed["precompute"] += time.perf_counter() - start
        timed["precompute_cpu"] += time.process_time() - cpu_start

    dpo.precompute_reference_logps = precompute
    cfg = OmegaConf.load(ROOT / "conf/gpt_dpo.yaml")
    overrides = [
        f"pretrained_checkpoint.restore_from_path={args.model_dir}", "model.tokenizer.model=null",
        f"model.encoder_seq_length={args.max_length}", f"model.data.max_seq_length={args.max_length}",
        f"model.data.data_prefix.train={args.data}", "model.data.data_prefix.validation=null",
        "model.data.shuffle=false", "model.data.drop_last=false",
        "trainer.dpo.max_epochs=1", "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=0",
        f"model.optim.lr={args.lr}", "model.optim.weight_decay=0.0", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", f"exp_manager.explicit_log_dir={args.work}/ours-{int(packed)}",
        "exp_manager.resume_if_exists=false", "model.dpo.ref_policy_kl_penalty=0.1",
    ]
    if packed:
        overrides += ["model.data.packing.enabled=true", f"model.data.packing.pack_size={args.pack_size}",
                      "model.data.packing.algorithm=first_fit_shuffle", "model.global_batch_size=1", "model.micro_batch_size=1",
                      f"model.data.packing.share_prompt={str(share_prompt).lower()}"]
    else:
        overrides += [f"model.global_batch_size={args.batch_size}", f"model.micro_batch_size={args.batch_size}"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    trainer = dpo.build_dpo_trainer(cfg)
    trainer.checkpoint_manager = None  # no checkpoint writes in a throughput run
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = trainer.fit()
    seconds = time.perf_counter() - start + timed["precompute"]
    cpu_seconds = time.process_time() - cpu_start + timed["precompute_cpu"]
    base = trainer.train_loader.dataset
    pairs = len(getattr(base, "dataset", base))
    tokens = sum(getattr(base, "dataset", base).lengths)
    report(args.side, seconds, cpu_seconds, pairs, trainer.step, baseline,
           {"train_loss_last_step": metrics.get("train/loss"), "precompute_seconds": timed["precompute"],
            "tokens": tokens})


# ------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (interleaved); the median is reported")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="most tokens per sequence (prompt + response)")
    parser.add_argument("--pack-size", type=int, default=2048, help="tokens per pack (ours, packed)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="trl,ours,ours-packed",
                        help="any of trl, ours, ours-packed, ours-packed-unshared (packed, each pair's prompt computed twice)")
    parser.add_argument("--trl-defaults", action="store_true", help="TRL with its own bf16 / gradient-checkpointing defaults")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        if args.side == "trl":
            run_trl(args)
        else:
            run_ours(args, packed=args.side.startswith("ours-packed"), share_prompt=args.side != "ours-packed-unshared")
        return

    from transformers import PreTrainedTokenizerFast

    work = tempfile.mkdtemp(prefix="dpo_vs_trl_")
    model_dir, data = Path(work) / "tiny-llama", Path(work) / "pairs.jsonl"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"))
    make_model_dir(model_dir, tok.vocab_size, args.seed)
    pairs = make_pairs(tok, args.pairs, args.max_length, args.seed)
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = [count(p["prompt"]) + count(p[k]) + 1 for p in pairs for k in ("chosen_response", "rejected_response")]
    print(f"model: random Llama (4 layers, hidden 256, GQA 4/2, vocab {tok.vocab_size}) in {model_dir}")
    print(f"data: {args.pairs} pairs, sequence lengths min {min(lengths)} / mean {sum(lengths) / len(lengths):.0f} / "
          f"max {max(lengths)} tokens; batch {args.batch_size} pairs; torch threads: default ({os.cpu_count()} cpus)")
    # A padded batch holds 2 * batch_size sequences of its longest length (TRL's layout),
    # averaged over random batch orders.
    per_pair = [lengths[i : i + 2] for i in range(0, len(lengths), 2)]
    rng, padded = random.Random(1), 0
    for _ in range(20):
        order = rng.sample(per_pair, len(per_pair))
        for b in range(0, len(order), args.batch_size):
            batch = [n for pair in order[b : b + args.batch_size] for n in pair]
            padded += len(batch) * max(batch)
    print(f"padding: a padded batch computes x{padded / 20 / sum(lengths):.2f} the real tokens (packing: x1.00)")

    runs = {side: [] for side in args.sides.split(",")}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every side alike
        for side in runs:
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(model_dir), "--data", str(data),
                   "--work", work, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--pack-size", str(args.pack_size), "--lr", str(args.lr)] + (["--trl-defaults"] if args.trl_defaults else [])
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"side {side} failed ({proc.returncode})")
            runs[side].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  {side}: {runs[side][-1]['pairs_per_s']:.2f} pairs/s, "
                  f"{runs[side][-1]['pairs_per_cpu_s']:.2f} pairs/cpu-s", flush=True)

    results = {}
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for side, rs in runs.items():
        results[side] = {
            "pairs_per_s": median([r["pairs_per_s"] for r in rs]),
            "pairs_per_cpu_s": median([r["pairs_per_cpu_s"] for r in rs]),
            "steps": rs[0]["steps"], "pairs": rs[0]["pairs"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "peak_rss_growth_mib": max(r["peak_rss_growth_mib"] for r in rs),
            "all_pairs_per_s": [round(r["pairs_per_s"], 3) for r in rs],
            "all_pairs_per_cpu_s": [round(r["pairs_per_cpu_s"], 3) for r in rs],
        }
    print(f"\nmedian of {args.repeats} runs (peak memory: the largest); pairs per CPU-second counts "
          "user+sys time of all threads, which load from other processes disturbs far less than wall time")
    print(f"{'side':<12} {'pairs/s':>9} {'pairs/cpu-s':>12} {'steps':>6} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for side, r in results.items():
        print(f"{side:<12} {r['pairs_per_s']:>9.2f} {r['pairs_per_cpu_s']:>12.2f} {r['steps']:>6} "
              f"{r['peak_rss_mib']:>13.0f} {r['peak_rss_growth_mib']:>11.0f}")
    if "trl" in results:
        trl = results["trl"]
        for side, r in results.items():
            if side != "trl":
                print(f"{side} / trl: throughput x{r['pairs_per_s'] / trl['pairs_per_s']:.2f} (wall), "
                      f"x{r['pairs_per_cpu_s'] / trl['pairs_per_cpu_s']:.2f} (CPU time); "
                      f"peak RSS x{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}, "
                      f"growth x{r['peak_rss_growth_mib'] / trl['peak_rss_growth_mib']:.2f}")
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
