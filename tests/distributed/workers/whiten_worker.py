"""Masked mean / variance and whitening over the data-parallel group, from each rank's share.

    torchrun --nproc-per-node 2 whiten_worker.py OUT_PREFIX
Every rank builds the same values and mask, keeps its contiguous share of the rows, and saves
the statistics and the whitened share computed with ``group=`` the data-parallel group.
"""

import sys

import torch
from megatron.core import parallel_state


def data():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.4).to(torch.float64)
    mask[4:] = 0
    mask[4, 0] = 1  # the last rank holds few entries: the statistics weigh entries, not ranks
    return values, mask


def main():
    from nemo_aligner.losses.policy import masked_mean_var, masked_whiten
    from nemo_aligner.utils import distributed

    distributed.initialize()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    values, mask = (t.chunk(dp)[rank] for t in data())
    group = parallel_state.get_data_parallel_group()
    mean, var = masked_mean_var(values, mask, group=group)
    torch.save({"mean": mean, "var": var, "whitened": masked_whiten(values, mask, group=group)}, f"{sys.argv[1]}.{rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
