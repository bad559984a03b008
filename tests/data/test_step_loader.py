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


def test_token_budget_chunks_are_the_longest_runs_that_fit_in_order():
    from nemo_aligner.data.loader import token_budget_chunks

    total = lambda run: sum(run)  # noqa: E731
    assert token_budget_chunks([5, 3, 4, 9, 2, 1], total, 10) == [[5, 3], [4], [9], [2, 1]]
    assert token_budget_chunks([12, 1, 1], total, 10) == [[12], [1, 1]]  # too long alone: a run of its own
    assert token_budget_chunks([1] * 7, total, 3) == [[1, 1, 1], [1, 1, 1], [1]]
    assert token_budget_chunks([], total, 10) == []


def test_token_budget_chunks_measure_each_item_once():
    """A run's width is the sum of its items' (linear in the items: a refilled run used to
    be measured again with every item added)."""
    from nemo_aligner.data.loader import token_budget_chunks

    calls = []

    def width(run):
        calls.append(len(run))
        return sum(run)

    items = [1] * 200
    assert [len(c) for c in token_budget_chunks(items, width, 64)] == [64, 64, 64, 8]
    assert calls == [1] * 200


def _row_collate(samples, pad_to):
    """One-row micro-batches: the samples back to back."""
    merged = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
    return sft_collate([merged], pad_id=0, pad_to=pad_to)


def _row_length(items):
    return sum(len(x["tokens"]) for x in items)


def test_one_row_micro_batches_fill_a_token_budget():
    """With a row_length (one-row micro-batches) and a token budget, a step's samples are cut
    into the fewest in-order runs that fit; every sample is in exactly one micro-batch."""
    from nemo_aligner.data.loader import token_budget_chunks

    row_collate, row_length = _row_collate, _row_length
    ds = ToyDataset([3, 9, 4, 5, 2, 7, 1, 6])
    sampler = MegatronBatchSampler(8, 0, global_batch_size=8, data_parallel_rank=0, data_parallel_size=1)
    fixed = StepLoader(ds, sampler, micro_batch_size=2, collate_fn=row_collate, pad_to_multiple_of=1,
                       row_length=row_length)
    budget = StepLoader(ds, sampler, micro_batch_size=2, collate_fn=row_collate, pad_to_multiple_of=1,
                        row_length=row_length, token_budget=16)
    a, b = next(iter(fixed)), next(iter(budget))
    assert len(a.micro_batches) == 4
    assert [len(c) for c in token_budget_chunks(ds.lengths, sum, 16)] == [3, 4, 1]  # 16, 15, 6 tokens
    assert len(b.micro_batches) == 3 and b.seq_length == 16
    for step in (a, b):
        tokens = torch.cat([mb["tokens"][mb["loss_mask"].bool()] for mb in step.micro_batches])
        assert sorted(tokens.unique().tolist()) == list(range(1, 9))
        assert int(sum(mb["loss_mask"].sum() for mb in step.micro_batches)) == sum(ds.lengths)
    # Without a row_length the budget does not apply (rows are samples, padded to the longest).
    plain = StepLoader(ds, sampler, micro_batch_size=2, collate_fn=collate, token_budget=16)
    assert plain.token_budget is None and len(next(iter(plain)).micro_batches) == 4


def test_micro_batches_keep_their_own_width_without_pipeline_parallelism():
    """``uniform_width=False``: each micro-batch padded to its own longest (rounded up), not
    to the step's; the same samples in the same micro-batches."""
    ds = ToyDataset([3, 9, 4, 5, 2, 7, 1, 6])
    sampler = MegatronBatchSampler(8, 0, global_batch_size=8, data_parallel_rank=0, data_parallel_size=1)
    common = dict(micro_batch_size=2, collate_fn=_row_collate, pad_to_multiple_of=4, row_length=_row_length,
                  token_budget=16)
    uniform = next(iter(StepLoader(ds, sampler, **common)))
    own = next(iter(StepLoader(ds, sampler, uniform_width=False, **common)))
    assert [mb["tokens"].shape[1] for mb in uniform.micro_batches] == [16, 16, 16]
    assert [mb["tokens"].shape[1] for mb in own.micro_batches] == [16, 16, 8]  # 16, 15, 6 tokens
    assert uniform.seq_length == own.seq_length == 16
    for a, b in zip(uniform.micro_batches, own.micro_batches):
        width = b["tokens"].shape[1]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key][:, :width], b[key]) and not a["loss_mask"][:, width:].any()
    # Rows of samples (no row_length): each micro-batch as wide as its longest sample.
    rows = StepLoader(ds, sampler, micro_batch_size=2, collate_fn=collate, pad_to_multiple_of=1, uniform_width=False)
    assert [mb["tokens"].shape[1] for mb in next(iter(rows)).micro_batches] == [9, 5, 7, 6]


def test_one_row_micro_batches_need_not_divide_the_batch():
    """With one-row micro-batches micro_batch_size only sizes the budget: a global batch of 3
    (or 1) at micro_batch_size 2 runs; with rows per sample it is refused, naming the key."""
    import pytest

    def row_collate(samples, pad_to):
        merged = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        return sft_collate([merged], pad_id=0, pad_to=pad_to)

    row_length = lambda items: sum(len(x["tokens"]) for x in items)  # noqa: E731
    ds = ToyDataset([3, 9, 4, 5, 2, 7])
    for gbs, chunks in ((3, [2, 1]), (1, [1])):
        sampler = lambda: MegatronBatchSampler(6, 0, global_batch_size=gbs, data_parallel_rank=0,  # noqa: E731
                                               data_parallel_size=1)
        first = next(iter(sampler()))
        for budget, expected in ((None, chunks), (64, [gbs])):
            step = next(iter(StepLoader(ds, sampler(), micro_batch_size=2, collate_fn=row_collate,
                                        pad_to_multiple_of=1, row_length=row_length, token_budget=budget)))
            assert len(step.micro_batches) == len(expected) and step.num_samples == gbs == len(first)
            assert int(sum(mb["loss_mask"].sum() for mb in step.micro_batches)) == sum(ds.lengths[i] for i in first)
        with pytest.raises(ValueError, match=r"not a multiple of micro_batch_size \(2\); adjust model.global_batch_size"):
            StepLoader(ds, sampler(), micro_batch_size=2, collate_fn=collate)
