"""StepLoader: equal-length micro-batches per step and padded partial batches."""

import torch

from nemo_aligner.data.datasets import sft_collate
from nemo_aligner.data.loader import StepLoader
from nemo_aligner.data.samplers import MegatronBatchSampler


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = self.lengths[i]
        return {"tokens": torch.full((n,), i + 1), "labels": torch.full((n,), i + 1),
                "loss_mask": torch.ones(n, dtype=torch.long), "position_ids": torch.arange(n)}


def collate(samples, pad_to):
    return sft_collate(samples, pad_id=0, pad_to=pad_to)


def test_micro_batches_share_one_length_rounded_up():
    ds = ToyDataset([3, 9, 4, 5])
    sampler = MegatronBatchSampler(4, 0, global_batch_size=4, data_parallel_rank=0, data_parallel_size=1)
    step = next(iter(StepLoader(ds, sampler, micro_batch_size=2, collate_fn=collate, pad_to_multiple_of=8)))
    assert step.seq_length == 16 and step.num_samples == 4
    assert [mb["tokens"].shape for mb in step.micro_batches] == [(2, 16), (2, 16)]
    assert sum(int(mb["loss_mask"].sum()) for mb in step.micro_batches) == 3 + 9 + 4 + 5


def test_partial_batch_padded_with_zero_loss_samples():
    ds = ToyDataset([3, 4, 5, 6, 7])  # 5 samples, global batch 4, keep the last partial batch
    sampler = MegatronBatchSampler(5, 4, global_batch_size=4, data_parallel_rank=1,
                                   data_parallel_size=2, drop_last=False)
    step = next(iter(StepLoader(ds, sampler, micro_batch_size=1, collate_fn=collate, pad_to_multiple_of=1)))
    # Rank 1 gets no real sample of the 1-sample final batch: two padding micro-batches.
    assert step.num_samples == 0 and len(step.micro_batches) == 2
    assert all(int(mb["loss_mask"].sum()) == 0 for mb in step.micro_batches)
