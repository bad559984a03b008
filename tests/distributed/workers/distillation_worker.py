"""The distillation loss (both directions, scales, SFT term) on this rank's vocabulary shard.

    torchrun --nproc-per-node 2 distillation_worker.py OUT_PREFIX TP
Saves, from each TP rank, the loss sums of both directions and the gradient of their sum
with respect to this rank's logits shard.
"""

import sys

import torch
from megatron.core import parallel_state


def main():
    out = sys.argv[1]
    from nemo_aligner.algorithms.distillation import DistillationSettings, distillation_loss_fn
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=int(sys.argv[2]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 64, generator=g) * 3
    batch = {
        "labels": torch.randint(0, 64, (3, 7), generator=g), "loss_mask": (torch.rand(3, 7, generator=g) > 0.3).long(),
        "topk_token_ids": torch.stack([torch.randperm(64, generator=g)[:5] for _ in range(21)]).view(3, 7, 5),
        "topk_logits": torch.randn(3, 7, 5, generator=g).sort(-1, descending=True).values * 2,
    }
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    shard = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    result = {}
    total = 0
    for kind in ("fwd_kl", "bwd_kl"):
        s = DistillationSettings(kd_loss=kind, kd_loss_weight=0.7, sft_loss_weight=0.3, logits_scale=1.3,
                                 target_logits_scale=0.8)
        loss_sum, _, sums = distillation_loss_fn(batch, s)(shard)
        result[kind] = torch.stack([sums["loss_sum"], sums["kd_loss_sum"], sums["sft_loss_sum"]])
        total = total + loss_sum
    total.backward()
    result["grad"] = shard.grad
    torch.save(result, f"{out}.{rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
