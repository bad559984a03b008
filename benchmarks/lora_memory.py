"""Peak memory of DPO with full fine-tuning against LoRA DPO, on the same model and data.

    PYTHONPATH=. python benchmarks/lora_memory.py [--hidden 512 --layers 8 --steps 3 --rank 16]

Each configuration runs the real DPO entry point in its own process (so peaks do not mix) with
the reference computed at each step (``model.dpo.ref_logprobs=swap``): full fine-tuning keeps a
CPU copy of the initial weights, LoRA switches its adapters off instead. Printed per run: peak
RSS, and the parts that LoRA removes, measured on the built trainer: the optimizer state (Adam
moments and fp32 main copies of the trainable parameters), the gradient buffers, the reference
copy, and the trainable-parameter fraction. The baseline is full DPO in the same invocation.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(args) -> None:
    """One DPO run in this process; prints a JSON line of its memory figures."""
    import resource

    import torch
    from hydra import compose, initialize_config_dir

    from nemo_aligner.algorithms.dpo import build_dpo_trainer
    from nemo_aligner.algorithms.reference import ReferenceWeights

    overrides = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={4 * args.hidden}",
        f"model.num_attention_heads={args.hidden // 64}", f"model.num_query_groups={args.hidden // 64}",
        "model.global_batch_size=8", "model.micro_batch_size=4", f"trainer.dpo.max_steps={args.steps}",
        "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=0", "model.dpo.ref_logprobs=swap",
        "exp_manager.checkpoint_callback_params.save_final_model=false", f"exp_manager.explicit_log_dir={args.log_dir}",
    ]
    if args.mode == "lora":
        overrides += ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
                      f"model.peft.lora_tuning.adapter_dim={args.rank}"]
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose(config_name="gpt_dpo", overrides=overrides)
    trainer = build_dpo_trainer(cfg)
    trainer.fit()
    model = trainer.model[0] if isinstance(trainer.model, list) else trainer.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    torch_optimizers = [o.optimizer for o in optimizers]
    state = [v for o in torch_optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    model_storage = {p.data_ptr() for p in params}
    mains = [p for o in torch_optimizers for g in o.param_groups for p in g["params"]
             if p.data_ptr() not in model_storage]  # fp32 main copies (none for an fp32 model)
    grads = [p.main_grad for p in trainable if getattr(p, "main_grad", None) is not None]
    reference = trainer.reference.cpu if isinstance(trainer.reference, ReferenceWeights) else []
    print(json.dumps({
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
        "weights_mib": _tensor_bytes(params) / 2**20,
        "optimizer_state_mib": (_tensor_bytes(state) + _tensor_bytes(mains)) / 2**20,
        "grad_buffers_mib": _tensor_bytes(grads) / 2**20,
        "reference_copy_mib": _tensor_bytes(reference) / 2**20,
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # set in the child
    p.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return
    results = {}
    for mode in ("full", "lora"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--mode", mode, "--log-dir", f"{tmp}/run", "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--steps", str(args.steps), "--rank", str(args.rank)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    print(f"DPO, hidden {args.hidden}, {args.layers} layers, {full['params'] / 1e6:.1f}M parameters (fp32), "
          f"LoRA rank {args.rank} on every linear, {args.steps} steps, reference computed each step")
    print(f"{'':22s}{'full':>12s}{'lora':>12s}{'saved':>12s}")
    for key, label in (("peak_rss_mib", "peak RSS (MiB)"), ("optimizer_state_mib", "optimizer state"),
                       ("grad_buffers_mib", "gradient buffers"), ("reference_copy_mib", "reference copy"),
                       ("weights_mib", "weights")):
        print(f"{label:22s}{full[key]:12.1f}{lora[key]:12.1f}{full[key] - lora[key]:12.1f}")
    print(f"trainable parameters: full {full['trainable'] / full['params']:.2%}, "
          f"lora {lora['trainable'] / lora['params']:.2%} ({lora['trainable'] / 1e6:.2f}M)")
    print(f"peak RSS ratio lora / full: {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
