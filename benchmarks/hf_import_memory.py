"""Peak memory of a Hugging Face import, against the size of the model.

Claim checked: importing a checkpoint holds at most one tensor beyond the model at a time
(each rank reads only its slices, one tensor at a time, straight into the parameters).

A random Llama-shaped model (default: 8 layers, hidden 1024, ffn 2816, GQA 16/4, vocab
32000, fp32: about 160 M parameters, 0.64 GB) is saved with ``transformers``, then loaded
in fresh processes, each measuring the growth of its peak resident memory over what it held
just before loading (the kernel's high-water mark ``VmHWM``, reset to the current RSS by
writing ``5`` to ``/proc/self/clear_refs`` right before the load, so import-time transients
do not hide in the baseline):

- ``nemo_aligner``: ``import_hf_model`` (model build without initialization + sliced load);
- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` of the same directory, the
  baseline run side by side.

Printed: model bytes, the largest single tensor, each loader's peak growth and its ratio to
the model's bytes; the target is ``ratio <= 1 + largest tensor / model bytes`` (plus
allocator slack) for ours.

    PYTHONPATH=. python benchmarks/hf_import_memory.py [--layers 8 --hidden 1024 ...]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the high-water mark to the current RSS; returns that RSS (kB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def child(loader: str, hf_dir: str) -> None:
    """Runs in a fresh process; prints one JSON line with the peak growth of the load."""
    import torch  # noqa: F401  (imported before the baseline is taken)

    if loader == "ours":
        from nemo_aligner.checkpoint.hf import import_hf_model
        from nemo_aligner.utils import distributed

        distributed.initialize()
        before = _reset_peak()
        model, _ = import_hf_model(hf_dir)
    else:
        from transformers import AutoModelForCausalLM

        before = _reset_peak()
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    loaded = _status_kb("VmHWM")
    # transformers leaves weights in the memory-mapped file until first touched; a forward
    # pass reads them all, so the resident cost of a usable model is measured after that.
    torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    touched = _status_kb("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth_bytes": (loaded - before) * 1024, "touched_bytes": (touched - before) * 1024,
                      "model_bytes_in_memory": model_bytes}))


def make_model(args, out_dir: Path) -> tuple[int, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
    return sum(sizes), max(sizes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--child", nargs=2, metavar=("LOADER", "HF_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "llama"
        model_bytes, largest = make_model(args, hf_dir)
        results = {}
        for loader in ("ours", "transformers"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", loader, str(hf_dir)],
                capture_output=True, text=True, check=True, cwd=REPO,
            ).stdout.strip().splitlines()[-1]
            results[loader] = json.loads(out)

    gb = 1e9
    print("Hugging Face import: peak memory growth against the model's size (fp32)")
    print("-" * 78)
    print(f"model                 Llama {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, "
          f"GQA {args.heads}/{args.kv_heads}, vocab {args.vocab}")
    print(f"model bytes           {model_bytes / gb:.3f} GB; largest tensor {largest / gb:.3f} GB "
          f"({largest / model_bytes:.3f} of the model)")
    print(f"target                growth <= model + one tensor = {1 + largest / model_bytes:.3f} x model")
    print(f"{'':22}{'peak growth: load':>24}{'load + touch every weight':>30}")
    for loader, r in results.items():
        print(f"{loader:<22}{r['growth_bytes'] / gb:9.3f} GB = {r['growth_bytes'] / model_bytes:.3f} x"
              f"{r['touched_bytes'] / gb:15.3f} GB = {r['touched_bytes'] / model_bytes:.3f} x model")
    ours, theirs = results["ours"]["touched_bytes"], results["transformers"]["touched_bytes"]
    print(f"ratio ours / transformers (usable model, weights resident)   {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
