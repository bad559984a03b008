"""What running Megatron-Core on CPU costs per SFT step (nemo_aligner/utils/cpu_support.py).

Three timings of the same global batch on the same model, median of repeats, in one run:

  A. the product's train step: Megatron schedule + DDP + optimizer, the CUDA-redirect mode
     active around Megatron's calls and lifted for the model's forward (the default);
  B. the same step with the mode left active during the forward as well (what a naive
     wrapper does);
  C. a floor: the model's forward + backward alone on the same micro-batches, no schedule,
     no mode, no optimizer.

Prints A/C (all framework overhead, optimizer included) and B/A (what lifting the mode
saves). Example:

    python benchmarks/cpu_support_overhead.py --hidden 256 --layers 4
"""

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
from omegaconf import OmegaConf


def build(args, log_dir):
    from nemo_aligner.algorithms.supervised import build_sft_trainer

    cfg = OmegaConf.load("conf/gpt_sft.yaml")
    del cfg["defaults"], cfg["hydra"]
    heads = max(args.hidden // 32, 2)
    overrides = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={int(args.hidden * 2.75) // 8 * 8}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={heads // 2}",
        f"model.micro_batch_size={args.micro_batch}", f"model.global_batch_size={args.global_batch}",
        "model.data.packing.enabled=true", "trainer.sft.val_check_interval=0",
        "trainer.sft.max_steps=1000", f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.resume_if_exists=false",
    ]
    return build_sft_trainer(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))


def median_time(fn, batches, repeats):
    fn(batches[0])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        times.append((time.perf_counter() - start) / len(batches))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import nemo_aligner.algorithms.trainer as trainer_module
    from nemo_aligner.models.forward import forward_batch
    from nemo_aligner.models.logprobs import token_logprobs

    with tempfile.TemporaryDirectory() as log_dir:
        trainer = build(args, log_dir)
        data = iter(trainer.train_loader)
        batches = [next(data) for _ in range(args.steps)]

        a = median_time(trainer.train_step, batches, args.repeats)
        lifted = trainer_module.native_torch
        trainer_module.native_torch = contextlib.nullcontext
        b = median_time(trainer.train_step, batches, args.repeats)
        trainer_module.native_torch = lifted

        module = trainer.model[0].module

        def bare(step_batch):
            for mb in step_batch.micro_batches:
                logp = token_logprobs(forward_batch(module, mb), mb["labels"], inplace=True)
                (-(logp * mb["loss_mask"]).sum()).backward()
            module.zero_grad(set_to_none=True)

        c = median_time(bare, batches, args.repeats)

    print(f"model: hidden {args.hidden}, layers {args.layers}, micro-batch {args.micro_batch}, "
          f"global batch {args.global_batch}, torch threads {torch.get_num_threads()}")
    print(f"A  train step (mode lifted in forward)  {a * 1e3:8.1f} ms")
    print(f"B  train step (mode active in forward)  {b * 1e3:8.1f} ms")
    print(f"C  forward+backward only (floor)        {c * 1e3:8.1f} ms")
    print(f"A/C = {a / c:.3f}  (schedule, DDP, optimizer and CPU support together)")
    print(f"B/A = {b / a:.3f}  (cost of leaving the mode on during the forward)")


if __name__ == "__main__":
    main()
