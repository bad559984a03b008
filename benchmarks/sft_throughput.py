"""SFT throughput and MFU on CPU, through the real training path.

What it runs
------------
A Llama-style GPT (RMSNorm, SwiGLU, RoPE, untied embeddings, no biases, GQA) trained
with SFT exactly as ``examples``/Hydra runs do: ``conf/gpt_sft.yaml`` + overrides ->
``nemo_aligner.algorithms.supervised.build_sft_trainer`` (gloo world of one, Megatron DDP,
distributed Adam, Megatron's no-pipelining schedule under ``cuda_on_cpu``). Steps are timed
by calling ``trainer.train_step(step_batch)`` directly on batches from
``trainer.train_loader`` (``fit()`` is not timed: it also validates and checkpoints).

Default model (``--hidden 512``): 4 layers, hidden 512, ffn 1408 (SwiGLU, 2.75x), 8
heads of 64, 4 query groups (GQA), sequence 512, global batch 8 = 2 micro-batches of 4,
fp32. Vocabulary: the bundled tokenizer ``data/quickstart/tokenizer.json`` (512 ids,
padded to 512). ``--vocab 32000`` pads the output layer to a Llama-2-sized vocabulary
(via ``model.make_vocab_size_divisible_by``): the extra rows are real logits that the
softmax/cross-entropy and the LM-head matmuls process.

Data is synthetic: JSONL ``{"input", "output"}`` samples written to a temp dir, each
tokenizing to exactly ``seq`` ids (prompt ~25%, response + EOS ~75%; ``seq`` is the most
``max_seq_length`` allows), i.e. ``seq - 1`` training tokens after the next-token shift,
so every micro-batch is ``[mbs, seq]`` with one padding position per row. With
``--packing``, samples have random lengths in ``[seq/8, seq/2]`` ids and are packed
(``model.data.packing.enabled=true``, pack size = seq). Padding is reported separately
and never counted as work.

Model FLOPs (the numerator of MFU)
----------------------------------
Only real (non-padding) tokens are counted. With ``d`` = hidden, ``L`` = layers, ``f`` =
ffn, ``a`` = heads * head_dim, ``g`` = query groups * head_dim, ``V`` = padded vocab::

    P_layer = d*(a + 2g) + a*d + d*2f + f*d          # QKV, out-proj, fc1 (gated), fc2
    N       = L * P_layer + d*V                      # matmul params: layers + LM head
    train FLOPs = 6 * N * tokens                     # fwd 2N, bwd 4N per token
                + 3 * L * sum_seq attn_fwd(s)        # fwd + bwd(2x) of QK^T and AV
    attn_fwd(s) = 2 * a * s * (s + 1)                # causal: only the lower triangle
                                                     #   (QK^T: a*s(s+1), AV: the same)

Causal attention is counted as HALF (only the s(s+1)/2 scores that are needed; the
PaLM/Megatron convention counts the full s^2, which is also printed). The input
embedding (a lookup), norms, activations, softmax and the optimizer are not counted.
Each ``s`` is a real sequence: a row without packing, a packed sample with packing.

Peak (the denominator of MFU)
-----------------------------
Measured in the same run with torch's current thread settings: best-of-N (after
warmup) fp32 ``torch.matmul`` into a preallocated output, for every GEMM shape a training
step performs on one micro-batch (forward ``x @ W^T``, data-grad ``dy @ W``, weight-grad
``dy^T @ x`` of QKV, out-proj, fc1, fc2 and the LM head; ``tokens = mbs * seq``) and a
square ``--square``^3 matmul; FLOP/s = 2*M*N*K / t. The peak is the maximum over shapes
and over two measurements, one before and one after the timed steps (shared/virtual
CPUs can throttle after a burst; the two are printed so a drop is visible, with the MFU
against the post-run peak alongside).

Usage::

    PYTHONPATH=. python benchmarks/sft_throughput.py            # default, ~2 min
    PYTHONPATH=. python benchmarks/sft_throughput.py --quick    # smoke test, < 30 s
    PYTHONPATH=. python benchmarks/sft_throughput.py --vocab 32000 --packing --no-profile
"""

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer.json"
CONFIG = REPO / "conf" / "gpt_sft.yaml"


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="default: 2.75 * hidden (1408 for 512)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=None, help="query groups (GQA); default heads/2")
    p.add_argument("--seq", type=int, default=512, help="sequence length (and pack size)")
    p.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    p.add_argument("--gbs", type=int, default=8, help="global batch size (samples/packs per step)")
    p.add_argument("--vocab", type=int, default=None,
                   help="pad the vocabulary to this size (default: the tokenizer's 512)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--packing", action="store_true", help="variable-length samples, packed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    p.add_argument("--peak-reps", type=int, default=5, help="best of N per matmul shape")
    p.add_argument("--square", type=int, default=2048, help="size of the square peak matmul")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler breakdown of one step")
    p.add_argument("--fwd-reps", type=int, default=2, help="forward-only passes timed (0: skip)")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke test: hidden 128, 2 layers, seq 128, 3 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.seq = 128, 2, 4, 128
        args.mbs, args.gbs, args.steps, args.warmup = 2, 4, 3, 1
        args.peak_reps, args.square, args.fwd_reps = 3, 512, 1
    if args.ffn is None:
        args.ffn = int(round(2.75 * args.hidden))
    if args.groups is None:
        args.groups = max(1, args.heads // 2)
    if args.hidden % args.heads or args.heads % args.groups:
        p.error("hidden must be divisible by heads, and heads by groups")
    if args.gbs % args.mbs:
        p.error("gbs must be a multiple of mbs")
    return args


# ----------------------------------------------------------------------------- data
def single_token_words(tokenizer):
    """Words ``w`` for which ``" " + w`` is one token (byte-level BPE: they concatenate)."""
    raw = json.loads(TOKENIZER.read_text(encoding="utf-8"))["model"]["vocab"]
    words = []
    for piece in raw:
        if piece.startswith("\u0120") and piece[1:].isalpha() and piece[1:].isascii():
            if len(tokenizer.text_to_ids(" " + piece[1:])) == 1:
                words.append(piece[1:])
    if len(words) < 8:
        raise RuntimeError(f"{TOKENIZER}: too few single-token words to build synthetic data")
    return sorted(words)


def sample_of_length(tokenizer, words, rng, n_ids, template):
    """An ``{"input", "output"}`` sample whose ids (prompt + response + EOS) number ``n_ids``."""
    from nemo_aligner.data.templates import render_prompt

    n_prompt = max(1, (n_ids - 1) // 4)
    prompt = "Task:" + "".join(" " + rng.choice(words) for _ in range(n_prompt))
    prompt_len = len(tokenizer.text_to_ids(render_prompt(template, prompt)))
    n_out = n_ids - 1 - prompt_len  # minus EOS
    if n_out < 1:
        raise ValueError(f"sequence of {n_ids} ids is too short for a prompt and a response")
    output = "".join(" " + rng.choice(words) for _ in range(n_out)).lstrip()
    # " w" is one token; the first response word has no leading space: fix up if it splits.
    while prompt_len + len(tokenizer.text_to_ids(output)) + 1 > n_ids:
        output = output.split(" ", 1)[1]
    while prompt_len + len(tokenizer.text_to_ids(output)) + 1 < n_ids:
        output += " " + rng.choice(words)
    assert prompt_len + len(tokenizer.text_to_ids(output)) + 1 == n_ids
    return {"input": prompt, "output": output}


def write_dataset(path, args, n_samples, seed=0):
    from nemo_aligner.data.templates import DEFAULT_PROMPT_TEMPLATE
    from nemo_aligner.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER))
    words = single_token_words(tokenizer)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_samples):
            # A sample may hold at most max_seq_length (= seq) ids, and trains on
            # tokens = ids[:-1]: seq - 1 real tokens, padded to seq (one padding position).
            n_ids = args.seq if not args.packing else rng.randint(args.seq // 8, args.seq // 2)
            f.write(json.dumps(sample_of_length(tokenizer, words, rng, n_ids, DEFAULT_PROMPT_TEMPLATE)) + "\n")


# ----------------------------------------------------------------------------- FLOPs
def layer_matmul_shapes(args, vocab):
    """(name, out_features, in_features) of every weight matrix a token passes through."""
    head_dim = args.hidden // args.heads
    a, g = args.heads * head_dim, args.groups * head_dim
    shapes = []
    for _ in range(args.layers):
        shapes += [("qkv", a + 2 * g, args.hidden), ("proj", args.hidden, a),
                   ("fc1", 2 * args.ffn, args.hidden), ("fc2", args.hidden, args.ffn)]
    shapes.append(("lm_head", vocab, args.hidden))
    return shapes


def matmul_params(args, vocab):
    return sum(o * i for _, o, i in layer_matmul_shapes(args, vocab))


def step_work(step_batch, pad_id):
    """(real tokens, processed positions incl. padding, list of real sequence lengths)."""
    real, positions, seqs = 0, 0, []
    for mb in step_batch.micro_batches:
        tokens, pos = mb["tokens"], mb["position_ids"]
        is_real = (pos > 0) | (tokens != pad_id)
        real += int(is_real.sum())
        positions += tokens.numel()
        if "cu_seqlens" in mb:
            flat = is_real.reshape(-1)
            cu = mb["cu_seqlens"].tolist()
            seqs += [e - s for s, e in zip(cu[:-1], cu[1:]) if e > s and bool(flat[s])]
        else:
            seqs += [int(n) for n in is_real.sum(dim=1).tolist() if n > 0]
    return real, positions, seqs


def step_flops(args, vocab, real_tokens, seqs):
    """(model FLOPs with causal attention counted half, same with it counted full)."""
    a = args.heads * (args.hidden // args.heads)
    dense = 6 * matmul_params(args, vocab) * real_tokens
    causal = 3 * args.layers * sum(2 * a * s * (s + 1) for s in seqs)
    full = 3 * args.layers * sum(4 * a * s * s for s in seqs)
    return dense + causal, dense + full


# ----------------------------------------------------------------------------- peak
def measure_peak(args, vocab, reps):
    """{label: FLOP/s} for the step's GEMM shapes and a square matmul (best of ``reps``)."""
    import torch

    t = args.mbs * args.seq
    shapes = {}
    for name, out_f, in_f in layer_matmul_shapes(args, vocab)[:4] + [layer_matmul_shapes(args, vocab)[-1]]:
        shapes[f"{name} fwd [{t}x{in_f}]@[{in_f}x{out_f}]"] = (t, in_f, out_f, "nt")
        shapes[f"{name} dgrad [{t}x{out_f}]@[{out_f}x{in_f}]"] = (t, out_f, in_f, "nn")
        shapes[f"{name} wgrad [{out_f}x{t}]@[{t}x{in_f}]"] = (out_f, t, in_f, "tn")
    n = args.square
    shapes[f"square [{n}x{n}]@[{n}x{n}]"] = (n, n, n, "nn")
    gen = torch.Generator().manual_seed(0)
    results = {}
    for label, (m, k, nn_, layout) in shapes.items():
        # Lay operands out as the model does (weights [out, in], x @ W^T; wgrad dy^T @ x).
        if layout == "nt":
            x, w = torch.randn(m, k, generator=gen), torch.randn(nn_, k, generator=gen).t()
        elif layout == "tn":
            x, w = torch.randn(k, m, generator=gen).t(), torch.randn(k, nn_, generator=gen)
        else:
            x, w = torch.randn(m, k, generator=gen), torch.randn(k, nn_, generator=gen)
        out = torch.empty(m, nn_)
        for _ in range(2):
            torch.matmul(x, w, out=out)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(x, w, out=out)
            best = min(best, time.perf_counter() - t0)
        results[label] = 2.0 * m * k * nn_ / best
        del x, w, out
    return results


# ----------------------------------------------------------------------------- profile
CATEGORIES = (
    ("GEMM (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "attention")),
    ("optimizer (adam/foreach)", ("_foreach", "adam", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("copies/cat/fill", ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_", "aten::clone",
                         "aten::contiguous", "aten::index", "aten::_to_copy", "aten::empty", "aten::full")),
)


def categorize(name):
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other ops (elementwise, norms, softmax/CE, ...)"


def profile_step(trainer, step_batch, top=15):
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(step_batch)
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    by_cat = {}
    for e in events:
        c = categorize(e.key)
        by_cat[c] = by_cat.get(c, 0.0) + e.self_cpu_time_total / 1e6
    top_ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "wall_s": wall,
        "in_ops_s": in_ops,
        "categories": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "top_ops": [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in top_ops],
        "num_op_calls": sum(e.count for e in events),
    }


# ----------------------------------------------------------------------------- main
def build_cfg(args, tmp, data_path, total_steps):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIG)
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    overrides = [
        f"exp_manager.explicit_log_dir={tmp}/log",
        "exp_manager.resume_if_exists=false",
        "exp_manager.checkpoint_callback_params.save_final_model=false",
        "trainer.sft.val_check_interval=0",
        "trainer.sft.save_interval=0",
        "trainer.sft.max_epochs=-1",
        f"trainer.sft.max_steps={total_steps}",
        f"model.micro_batch_size={args.mbs}",
        f"model.global_batch_size={args.gbs}",
        f"model.encoder_seq_length={args.seq}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}",
        f"model.tokenizer.model={TOKENIZER}",
        f"model.data.data_prefix.train={data_path}",
        "model.data.data_prefix.validation=null",
        f"model.data.packing.enabled={str(args.packing).lower()}",
        f"model.data.packing.pack_size={args.seq}",
    ]
    if args.vocab is not None:
        overrides.append(f"model.make_vocab_size_divisible_by={args.vocab}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def fmt_flops(x):
    return f"{x / 1e12:.3f} TFLOP/s ({x / 1e9:.1f} GFLOP/s)"


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    import warnings

    import torch

    # Megatron calls deprecated torch.distributed APIs every step; keep the table readable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from nemo_aligner.algorithms.supervised import build_sft_trainer
    from nemo_aligner.utils import distributed

    tmp = tempfile.mkdtemp(prefix="sft_bench_")
    try:
        total_steps = args.warmup + args.steps + (1 if args.profile else 0)
        # Packing puts several samples in each of the gbs rows of a step.
        per_step = args.gbs * (8 if args.packing else 1)
        data_path = os.path.join(tmp, "train.jsonl")
        write_dataset(data_path, args, per_step * total_steps)
        cfg = build_cfg(args, tmp, data_path, total_steps)

        t0 = time.perf_counter()
        trainer = build_sft_trainer(cfg)
        build_s = time.perf_counter() - t0
        gpt = trainer.model[0].module
        vocab = int(gpt.output_layer.weight.shape[0])
        pad_id = trainer.train_loader.collate_fn.keywords["pad_id"]

        # Cross-check the FLOP formula's parameter count against the built model.
        counted = matmul_params(args, vocab)
        actual = sum(p.numel() for n, p in gpt.named_parameters()
                     if p.dim() == 2 and "embedding" not in n)
        if counted != actual:
            raise RuntimeError(f"FLOP formula counts {counted} matmul params, model has {actual}")

        peak_before = measure_peak(args, vocab, args.peak_reps)

        fwd_bwd_times = []
        original_rgb = trainer.run_global_batch

        def timed_run_global_batch(step_batch, forward_only):
            t = time.perf_counter()
            result = original_rgb(step_batch, forward_only)
            fwd_bwd_times.append(time.perf_counter() - t)
            return result

        trainer.run_global_batch = timed_run_global_batch  # this instance only

        data_iter = iter(trainer.train_loader)
        records = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step_batch = next(data_iter)
            t1 = time.perf_counter()
            metrics = trainer.train_step(step_batch)
            t2 = time.perf_counter()
            real, positions, seqs = step_work(step_batch, pad_id)
            flops_half, flops_full = step_flops(args, vocab, real, seqs)
            records.append({
                "data_s": t1 - t0, "step_s": t2 - t1, "fwd_bwd_s": fwd_bwd_times[-1],
                "tokens": real, "positions": positions, "num_seqs": len(seqs),
                "flops": flops_half, "flops_full_attn": flops_full,
                "loss": metrics.get("train/loss"),
            })
            tag = "warmup" if i < args.warmup else "timed"
            print(f"  step {i + 1:2d} ({tag}): {t2 - t1:7.3f} s  fwd+bwd {fwd_bwd_times[-1]:7.3f} s  "
                  f"data {t1 - t0:6.3f} s  loss {metrics.get('train/loss', float('nan')):.4f}",
                  flush=True)
        timed = records[args.warmup:]

        fwd_only = []
        for _ in range(args.fwd_reps):
            for chunk in trainer.model:
                chunk.train()
            t0 = time.perf_counter()
            original_rgb(step_batch, True)
            fwd_only.append(time.perf_counter() - t0)

        prof = profile_step(trainer, next(data_iter)) if args.profile else None
        peak_after = measure_peak(args, vocab, args.peak_reps)
        trainer.metrics_logger.close()
        distributed.destroy()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ report
    med = statistics.median
    step_s = med([r["step_s"] for r in timed])
    fb_s = med([r["fwd_bwd_s"] for r in timed])
    data_s = med([r["data_s"] for r in timed])
    tokens = med([r["tokens"] for r in timed])
    positions = med([r["positions"] for r in timed])
    flops = med([r["flops"] for r in timed])
    flops_full = med([r["flops_full_attn"] for r in timed])
    achieved = flops / step_s
    peak_label, peak = max({**{f"{k} (before)": v for k, v in peak_before.items()},
                            **{f"{k} (after)": v for k, v in peak_after.items()}}.items(),
                           key=lambda kv: kv[1])
    peak_b, peak_a = max(peak_before.values()), max(peak_after.values())
    head_dim = args.hidden // args.heads
    n_params = sum(p.numel() for p in gpt.parameters())

    rows = [
        ("model", f"Llama-style GPT: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn} (SwiGLU), "
                  f"{args.heads} heads x {head_dim}, {args.groups} query groups, vocab {vocab} (padded), fp32"),
        ("params", f"{n_params / 1e6:.2f} M total, {counted / 1e6:.2f} M in matmuls (incl. LM head)"),
        ("batch", f"seq {args.seq}, global batch {args.gbs} = {args.gbs // args.mbs} micro-batches of {args.mbs}"
                  + (", packed" if args.packing else ", one sample per row")),
        ("threads", f"torch.get_num_threads() = {torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})"),
        ("tokens/step", f"{tokens:.0f} real"
                        + (f" of {positions:.0f} positions ({100 * tokens / positions:.1f}% full), "
                           f"{med([r['num_seqs'] for r in timed]):.0f} sequences" if positions != tokens else "")),
        ("model FLOPs/token", f"{flops / tokens / 1e6:.1f} MFLOP (causal attention half; "
                              f"{flops_full / tokens / 1e6:.1f} with full attention)"),
        ("step time (median)", f"{step_s:.3f} s over {len(timed)} steps "
                               f"(min {min(r['step_s'] for r in timed):.3f}, max {max(r['step_s'] for r in timed):.3f})"),
        ("  fwd+bwd (schedule)", f"{fb_s:.3f} s ({100 * fb_s / step_s:.1f}%)"
                                 + (f"; forward alone ~{med(fwd_only):.3f} s, so backward ~{fb_s - med(fwd_only):.3f} s"
                                    if fwd_only else "")),
        ("  optimizer + rest", f"{step_s - fb_s:.3f} s ({100 * (step_s - fb_s) / step_s:.1f}%) "
                               "(zero grads, Adam step, grad-norm/clip, LR schedule)"),
        ("  data (not in step)", f"{data_s:.3f} s/step (collate; excluded from tokens/s)"),
        ("tokens/s", f"{tokens / step_s:,.0f}  (incl. data loading: {tokens / (step_s + data_s):,.0f})"),
        ("achieved model FLOP/s", fmt_flops(achieved)),
        ("measured peak FLOP/s", f"{fmt_flops(peak)} - {peak_label}"),
        ("  peak before / after", f"{peak_b / 1e9:.1f} / {peak_a / 1e9:.1f} GFLOP/s"
                                  + ("  <-- CPU throttled during the run?" if peak_a < 0.8 * peak_b else "")),
        ("MFU", f"{100 * achieved / peak:.1f} %  (vs post-run peak: {100 * achieved / peak_a:.1f} %; "
                f"full-attention count: {100 * flops_full / step_s / peak:.1f} %)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("SFT throughput on CPU (nemo_aligner, build_sft_trainer + train_step)")
    print("-" * 100)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * 100)
    print("matmul FLOP/s by shape (GFLOP/s, best of "
          f"{args.peak_reps}; before / after the timed steps):")
    for label in peak_before:
        print(f"  {label:<46} {peak_before[label] / 1e9:7.1f} / {peak_after[label] / 1e9:7.1f}")
    if prof is not None:
        print("-" * 100)
        print(f"profile of one train_step (torch.profiler; {prof['wall_s']:.3f} s wall under the profiler, "
              f"{prof['num_op_calls']} op calls):")
        for cat, s in prof["categories"].items():
            print(f"  {cat:<46} {s:7.3f} s  {100 * s / prof['wall_s']:5.1f} %")
        outside = prof["wall_s"] - prof["in_ops_s"]
        print(f"  {'outside ops (Python, dispatch, mode hooks)':<46} {outside:7.3f} s  "
              f"{100 * outside / prof['wall_s']:5.1f} %")
        print("  top ops by self CPU time:")
        for name, count, s in prof["top_ops"]:
            print(f"    {name:<44} {count:6d} calls {s:7.3f} s  {100 * s / prof['wall_s']:5.1f} %")
    print(f"(total benchmark time {time.perf_counter() - t_start:.0f} s, of which trainer build {build_s:.1f} s)")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({
                "args": vars(args), "vocab_padded": vocab, "matmul_params": counted,
                "tokens_per_step": tokens, "positions_per_step": positions,
                "step_s_median": step_s, "fwd_bwd_s_median": fb_s, "fwd_only_s": fwd_only,
                "tokens_per_s": tokens / step_s, "achieved_flops": achieved,
                "peak_flops": peak, "peak_label": peak_label, "mfu": achieved / peak,
                "mfu_vs_post_run_peak": achieved / peak_a, "steps": records,
                "peak_before": peak_before, "peak_after": peak_after, "profile": prof,
            }, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
