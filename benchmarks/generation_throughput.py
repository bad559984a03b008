"""Rollout generation speed on CPU against ``transformers`` ``generate``, and refit time
against building a fresh engine.

What it runs
------------
Random Llama-shaped models (4 layers, GQA 4/2 heads, fp32), by default three sizes
(``--sizes``, ``hidden:ffn:vocab``): ``64:176:512``, a test-sized model where per-step
overhead dominates; ``256:688:2048``, where each decoding step streams the 16 MB of
weights through the memory system on both sides; and ``256:688:32000``, the same layers
with a real tokenizer's vocabulary, where the output layer's product and the choice of a
token among 32000 dominate a step. Each is built with ``transformers`` and
saved with ``save_pretrained``; ours is the same directory imported with
``nemo_aligner.checkpoint.hf.import_hf_model`` -- the very same weights on both sides.
16 prompts of random token ids with lengths drawn uniformly from [16, 64] (seeded), 128 new
tokens each, no EOS (both sides produce exactly 16 x 128 tokens), for two settings:
greedy, and sampling (temperature 0.8, top-k 50, top-p 0.9).

- ``transformers``: ``model.generate`` on the left-padded batch with its attention mask
  (``do_sample`` and the same temperature / top-k / top-p), ``torch.inference_mode``.
- ``ours``: ``MegatronEngine.generate`` on the prompts (left padding, per-row positions,
  per-sample seeds), with the lean decoder (the default on CPU; its decoding steps on the
  compiled CPU kernels of ``nemo_aligner.generation.cpu_kernels`` where a C compiler is
  found, as printed, or on torch's with ``NEMO_ALIGNER_CPU_KERNELS=0``) and, for reference,
  the decoder that runs ``GPTModel.forward`` with Megatron's ``StaticInferenceContext``.

Each configuration runs ``--repeats`` times, interleaved with the others, after one warm-up
run; the machine is shared, so the best (minimum) time is the headline number and the
median is printed beside it. Throughput = new tokens / wall time of the generate call
(prefill included). Greedy outputs of ours and transformers are compared token for token.

Refit
-----
``MegatronEngine.with_own_weights`` (the engine holds its own copy of the weights: fp32, or
bf16 from an fp32 trainer): time to build a fresh engine from the training model (allocate
the model, copy the weights) against ``engine.refit(training_model)`` (copy in place into
the preallocated tensors), best of ``--repeats``; also a larger model (``--refit-hidden``,
``--refit-layers``, vocabulary 32000) where copying dominates. An engine sharing the
training model's weights refits for free (nothing to do), also printed.

Log-prob consistency
--------------------
``token_mult_prob_error`` = mean over generated tokens of ``exp(|logp_gen - logp_train|)``
for the sampled outputs: fp32 engine vs the trainer's cache-free forward, and a bf16
own-weights engine vs the fp32 trainer.

    PYTHONPATH=. python benchmarks/generation_throughput.py [--repeats 3] [--threads N] [--json out.json]
"""

import argparse
import json
import statistics
import tempfile
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64:176:512,256:688:2048,256:688:32000", help="hidden:ffn:vocab,...")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--refit-hidden", type=int, default=768)
    p.add_argument("--refit-layers", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens, 1 repeat, no large refit model")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def hf_llama(args, out_dir, hidden, ffn, layers, vocab):
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # fixed-length generation on both sides
    model.save_pretrained(out_dir)
    return model


def time_call(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def summarize(times):
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def bench_size(args, hidden, ffn, vocab):
    """Throughput, greedy parity and log-prob consistency for one model size."""
    from nemo_aligner.checkpoint.hf import import_hf_model
    from nemo_aligner.generation import SamplingParams
    from nemo_aligner.generation.consistency import token_mult_prob_error, trainer_logprobs
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    tmp = tempfile.TemporaryDirectory()
    hf = hf_llama(args, tmp.name, hidden, ffn, args.layers, vocab)
    model, cfg = import_hf_model(tmp.name)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    padded = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros(args.batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    new = args.new_tokens
    settings = {
        "greedy": (SamplingParams(greedy=True, max_new_tokens=new), dict(do_sample=False)),
        "sampling": (SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=new),
                     dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)),
    }
    engines = {d: MegatronEngine(model, vocab_size=vocab, eos_id=None, pad_id=0, decoder=d)
               for d in ("lean", "megatron")}
    seeds = list(range(args.batch))

    def run_hf(kwargs):
        with torch.inference_mode():
            out = hf.generate(padded, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=0, **kwargs)
        return out[:, width:]

    runners = {}
    for name, (params, hf_kwargs) in settings.items():
        runners[(name, "transformers")] = lambda k=hf_kwargs: run_hf(k)
        for decoder, eng in engines.items():
            runners[(name, f"ours_{decoder}")] = lambda e=eng, p=params: e.generate(prompts, p, seeds=seeds)

    print(f"model: {args.layers} layers, hidden {hidden}, ffn {ffn}, vocab {vocab} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params); batch {args.batch}, "
          f"prompts {min(lengths)}-{max(lengths)} tokens, {new} new tokens")
    outputs = {key: fn() for key, fn in runners.items()}  # warm-up (and outputs to compare)
    times = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, fn in runners.items():
            times[key].append(time_call(fn)[0])

    tokens = args.batch * new
    results = {"throughput": {}, "token_mult_prob_error": {}}
    for name in settings:
        base = summarize(times[(name, "transformers")])
        row = {"transformers": dict(base, tokens_per_s=tokens / base["best_s"])}
        for decoder in engines:
            ours = summarize(times[(name, f"ours_{decoder}")])
            produced = int(outputs[(name, f"ours_{decoder}")].response_lengths.sum())
            assert produced == tokens, f"{decoder} produced {produced} tokens, expected {tokens}"
            row[f"ours_{decoder}"] = dict(ours, tokens_per_s=tokens / ours["best_s"],
                                          speedup_best=base["best_s"] / ours["best_s"],
                                          speedup_median=base["median_s"] / ours["median_s"])
        results["throughput"][name] = row
        for label, r in row.items():
            extra = f"  x{r['speedup_best']:.2f} (median x{r['speedup_median']:.2f})" if "speedup_best" in r else ""
            print(f"{name:8s} {label:16s} {r['tokens_per_s']:8.0f} tok/s  best {r['best_s']:.3f}s "
                  f"median {r['median_s']:.3f}s{extra}")
    hf_greedy = outputs[("greedy", "transformers")].tolist()
    same = outputs[("greedy", "ours_lean")].response_ids == hf_greedy
    results["greedy_equals_transformers"] = same
    print(f"greedy tokens equal transformers': {same}")

    # Log-prob consistency against the trainer's cache-free forward.
    sampled = outputs[("sampling", "ours_lean")]
    results["token_mult_prob_error"]["fp32_engine"] = token_mult_prob_error(
        sampled.logprobs, trainer_logprobs(model, sampled), sampled.response_lengths)
    bf16 = MegatronEngine.with_own_weights(cfg, model, vocab_size=vocab, eos_id=None, pad_id=0, precision="bf16")
    out16 = bf16.generate(prompts, settings["sampling"][0], seeds=seeds)
    results["token_mult_prob_error"]["bf16_engine_vs_fp32_trainer"] = token_mult_prob_error(
        out16.logprobs, trainer_logprobs(model, out16), out16.response_lengths)
    for k, v in results["token_mult_prob_error"].items():
        print(f"token_mult_prob_error {k}: {v:.6f}")

    return results, (model, cfg)


def bench_refit(args, models):
    """Fresh own-weights engine vs refit in place, for each ``(label, (model, cfg))``."""
    from nemo_aligner.checkpoint.hf import import_hf_model
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    results = {}
    if not args.quick:
        big = tempfile.TemporaryDirectory()
        hf_llama(args, big.name, args.refit_hidden, args.refit_hidden * 11 // 4, args.refit_layers, 32000)
        models["large"] = import_hf_model(big.name)
    for label, (source, source_cfg) in models.items():
        params = sum(p.numel() for p in source.parameters())
        for precision in ("32", "bf16"):
            kw = dict(vocab_size=source_cfg["vocab_size"], eos_id=None, pad_id=0, precision=precision)
            build = [time_call(lambda: MegatronEngine.with_own_weights(source_cfg, source, **kw)) for _ in range(args.repeats)]
            eng = build[-1][1]
            refit = [time_call(lambda: eng.refit(source))[0] for _ in range(max(args.repeats, 3))]
            entry = {"params": params, "fresh_build_s": min(t for t, _ in build), "refit_s": min(refit)}
            entry["ratio"] = entry["fresh_build_s"] / entry["refit_s"]
            results[f"{label}_{precision}"] = entry
            print(f"refit {label} ({params / 1e6:.1f}M params, engine {precision}): fresh build "
                  f"{entry['fresh_build_s'] * 1e3:.1f} ms, refit {entry['refit_s'] * 1e3:.2f} ms, x{entry['ratio']:.0f}")
    source, _ = next(iter(models.values()))
    shared = MegatronEngine(source, vocab_size=1)
    results["shared_s"] = min(time_call(lambda: shared.refit(source))[0] for _ in range(3))
    print(f"refit of an engine sharing the training weights: {results['shared_s'] * 1e6:.1f} us (no copy)")
    return results


def main():
    args = parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from nemo_aligner.generation import cpu_kernels

    kernels = "compiled" if cpu_kernels.library() is not None else "torch's"
    print(f"threads={torch.get_num_threads()}, CPU decoding kernels: {kernels}")
    results = {"config": vars(args), "cpu_kernels": kernels, "sizes": {}}
    models = {}
    for size in args.sizes.split(","):
        hidden, ffn, vocab = (int(v) for v in size.split(":"))
        results["sizes"][size], models[f"hidden{hidden}_vocab{vocab}"] = bench_size(args, hidden, ffn, vocab)
    results["refit"] = bench_refit(args, models)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
