"""Vocab-parallel log-probs and entropy (values and gradients) on this rank's TP shard.

    torchrun --nproc-per-node 2 logprobs_worker.py OUT_PREFIX
Saves, from each TP rank, the log-probs, entropies and the gradient of their sum w.r.t.
this rank's logits shard.
"""

import sys

import torch
from megatron.core import parallel_state


def main():
    out = sys.argv[1]
    from nemo_aligner.models.logprobs import token_entropy, token_logprobs
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=int(sys.argv[2]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 64, generator=g) * 4
    target = torch.randint(0, 64, (3, 7), generator=g)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    shard = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    logp = token_logprobs(shard, target)
    ent = token_entropy(shard)
    (logp.sum() + 0.5 * ent.sum()).backward()
    torch.save({"logp": logp.detach(), "entropy": ent.detach(), "grad": shard.grad}, f"{out}.{rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
