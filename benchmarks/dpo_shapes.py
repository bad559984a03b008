"""DPO, whole process, several data and model shapes: ours with the defaults a user runs
(``conf/gpt_dpo.yaml``: padding-free micro-batches, reference log-probs precomputed for the
samples the run reads, validation on ``limit_val_batches`` batches) against TRL's
``DPOTrainer`` (fp32, no gradient checkpointing, its reference forward every step).

Both sides: the same random tiny Llama (one Hugging Face directory), the same pairs (lengths
long-tailed, as in ``dpo_vs_trl.py``), ``--steps`` steps of ``--batch`` pairs, lr 1e-5, beta 0.1.
Ours also runs one validation batch at the end (TRL does none): the case a user first tried.
Each side is one process timed from start to exit, ``--repeats`` times, interleaved.

TRL needs numpy >= 2 (``datasets``), PyTriton numpy < 2: TRL runs from its own venv::

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl
    python benchmarks/dpo_shapes.py --trl-python .venv-trl/bin/python
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
sys.path.insert(0, str(Path(__file__).parent))

SHAPES = {  # name: model (hidden, layers[, vocab]), pairs, max length, steps, batch
    "issue": dict(hidden=128, layers=2, pairs=512, max_length=96, steps=64, batch=8),
    "short-pairs": dict(hidden=256, layers=4, pairs=256, max_length=64, steps=32, batch=8),
    "long-pairs": dict(hidden=256, layers=4, pairs=128, max_length=512, steps=16, batch=8),
    "larger-model": dict(hidden=512, layers=6, pairs=128, max_length=128, steps=16, batch=8),
    "few-steps": dict(hidden=256, layers=4, pairs=64, max_length=128, steps=4, batch=8),
    "many-steps": dict(hidden=128, layers=2, pairs=1024, max_length=64, steps=128, batch=8),
    "one-pair-steps": dict(hidden=128, layers=2, pairs=64, max_length=128, steps=64, batch=1),
    "big-batch": dict(hidden=256, layers=4, pairs=512, max_length=128, steps=8, batch=64),
    # A Llama-2-sized vocabulary (the tokenizer uses its first 512 ids): the output layer and
    # the log-softmax over 32000 entries cost more than the transformer.
    "large-vocab": dict(hidden=256, layers=4, vocab=32000, pairs=128, max_length=128, steps=16, batch=8),
}


def make_model(out: Path, hidden: int, layers: int, vocab: int = 0, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    heads = max(2, hidden // 64)
    config = LlamaConfig(vocab_size=max(vocab, tok.vocab_size), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)


def run_trl(args) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
    data = load_dataset("json", data_files=args.data, split="train")
    data = data.rename_columns({"chosen_response": "chosen", "rejected_response": "rejected"})
    config = DPOConfig(output_dir=args.work + "/trl", per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, max_length=args.max_length,
                       save_strategy="no", report_to=[], use_cpu=True, logging_steps=10**9, seed=1234,
                       disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok).train()


def ours_cmd(args, log_dir) -> list[str]:
    return [sys.executable, str(ROOT / "examples/nlp/gpt/train_gpt_dpo.py"),
            f"pretrained_checkpoint.restore_from_path={args.model_dir}", f"model.encoder_seq_length={args.max_length}",
            f"model.data.data_prefix.train={args.data}", f"model.data.data_prefix.validation={args.val}",
            f"trainer.dpo.max_steps={args.steps}", "trainer.dpo.limit_val_batches=1", f"trainer.dpo.val_check_interval={args.steps}",
            f"model.global_batch_size={args.batch}", f"model.optim.lr=1e-5", "model.optim.sched.name=Constant",
            "model.optim.sched.warmup_steps=0", f"exp_manager.explicit_log_dir={log_dir}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", str(ROOT / ".venv-trl/bin/python")))
    for key in ("side", "model-dir", "data", "work"):
        parser.add_argument(f"--{key}", help=argparse.SUPPRESS)
    for key in ("steps", "batch", "max-length"):
        parser.add_argument(f"--{key}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "trl":
        run_trl(args)
        return
    from dpo_vs_trl import make_pairs
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"))
    # Our package's bytecode, as an installed package has it (TRL's side loads its packages'
    # .pyc): an editable install under PYTHONDONTWRITEBYTECODE=1 would compile ~40 modules in
    # every process (~0.12 s here).
    import compileall

    compileall.compile_dir(str(ROOT / "nemo_aligner"), quiet=1)
    results = {}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        work = tempfile.mkdtemp(prefix=f"dpo_{name}_")
        model_dir = Path(work) / "model"
        make_model(model_dir, shape["hidden"], shape["layers"], shape.get("vocab", 0))
        pairs = make_pairs(tok, shape["pairs"] + shape["batch"], shape["max_length"], seed=1)
        data, val = Path(work) / "train.jsonl", Path(work) / "val.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs[: shape["pairs"]]))
        val.write_text("".join(json.dumps(p) + "\n" for p in pairs[shape["pairs"]:]))
        times = {"ours": [], "trl": []}
        for r in range(args.repeats):
            for side in ("ours", "trl"):
                if side == "ours":
                    a = argparse.Namespace(model_dir=model_dir, data=data, val=val, max_length=shape["max_length"],
                                           steps=shape["steps"], batch=shape["batch"])
                    cmd = ours_cmd(a, Path(work) / f"ours-{r}")
                    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                else:
                    cmd = [args.trl_python, __file__, "--side", "trl", "--model-dir", str(model_dir), "--data", str(data),
                           "--work", work, "--steps", str(shape["steps"]), "--batch", str(shape["batch"]),
                           "--max-length", str(shape["max_length"])]
                    env = dict(os.environ)
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{name} {side} failed:\n{proc.stderr[-3000:]}")
                times[side].append(seconds)
        median = {side: sorted(t)[len(t) // 2] for side, t in times.items()}
        results[name] = {**shape, "ours_s": median["ours"], "trl_s": median["trl"], "speedup": median["trl"] / median["ours"],
                         "all": {k: [round(x, 2) for x in v] for k, v in times.items()}}
        print(f"{name}: ours {median['ours']:.1f} s, trl {median['trl']:.1f} s -> x{results[name]['speedup']:.2f} "
              f"(pairs/s ours {shape['steps'] * shape['batch'] / median['ours']:.1f}, "
              f"trl {shape['steps'] * shape['batch'] / median['trl']:.1f})", flush=True)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
