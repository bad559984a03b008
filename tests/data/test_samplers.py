import itertools

import pytest
import torch

from nemo_aligner.data.samplers import MegatronBatchSampler


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def global_batches(total, gbs, dp, steps, consumed=0, **kw):
    """Each step's global batch, rebuilt as the concatenation of every rank's chunk."""
    per_rank = [take(MegatronBatchSampler(total, consumed, gbs, r, dp, **kw), steps) for r in range(dp)]
    return [sum((per_rank[r][s] for r in range(dp)), []) for s in range(steps)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_global_batch_independent_of_dp(shuffle, drop_last):
    reference = global_batches(50, 8, 1, 20, shuffle=shuffle, drop_last=drop_last)
    for dp in (2, 4, 8):
        assert global_batches(50, 8, dp, 20, shuffle=shuffle, drop_last=drop_last) == reference
    rank1 = take(MegatronBatchSampler(50, 0, 8, 1, 4, shuffle=shuffle, drop_last=drop_last), 1)[0]
    assert rank1 == reference[0][2:4]  # contiguous chunks


def test_order_without_shuffle():
    sampler = MegatronBatchSampler(10, 0, 4, 0, 1)
    assert sampler.steps_per_epoch == 2 and sampler.samples_per_epoch == 8
    assert take(sampler, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert sampler.consumed_samples == 16


def test_partial_final_batch_without_drop_last():
    batches = [take(MegatronBatchSampler(10, 0, 4, r, 2, drop_last=False), 4) for r in range(2)]
    assert batches[0] == [[0, 1], [4, 5], [8], [0, 1]]
    assert batches[1] == [[2, 3], [6, 7], [9], [2, 3]]
    sampler = MegatronBatchSampler(11, 0, 8, 3, 4, drop_last=False)
    assert sampler.steps_per_epoch == 2
    assert take(sampler, 2) == [[6, 7], []]  # partial batch of 3 over 4 ranks: [8], [9], [10], []
    assert sampler.consumed_samples == 11
    assert [take(MegatronBatchSampler(11, 0, 8, r, 4, drop_last=False), 2)[1] for r in range(3)] == [[8], [9], [10]]
    assert [take(MegatronBatchSampler(13, 0, 8, r, 2, drop_last=False), 2)[1] for r in range(2)] == [[8, 9, 10], [11, 12]]


def test_dataset_smaller_than_global_batch():
    with pytest.raises(ValueError) as err:
        MegatronBatchSampler(3, 0, 4, 0, 1)
    assert str(err.value) == (
        "dataset has 3 samples, fewer than global_batch_size 4; lower model.global_batch_size or set model.data.drop_last=false"
    )
    sampler = MegatronBatchSampler(3, 0, 4, 0, 2, drop_last=False)
    assert sampler.steps_per_epoch == 1
    assert take(sampler, 2) == [[0, 1], [0, 1]]
    assert sampler.consumed_samples == 6


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_equals_continuing(drop_last, shuffle):
    kw = dict(drop_last=drop_last, shuffle=shuffle, seed=9)
    sampler = MegatronBatchSampler(23, 0, 6, 1, 2, **kw)
    uninterrupted, consumed = [], []
    for batch in itertools.islice(iter(sampler), 15):
        uninterrupted.append(batch)
        consumed.append(sampler.consumed_samples)
    for step in (1, 3, 4, 7, 12):  # mid-epoch and at epoch boundaries
        resumed = MegatronBatchSampler(23, consumed[step - 1], 6, 1, 2, **kw)
        assert take(resumed, 15 - step) == uninterrupted[step:]


def test_shuffle_per_epoch_and_reproducible():
    sampler = MegatronBatchSampler(12, 0, 4, 0, 1, shuffle=True, seed=5)
    epochs = [sum(batch, []) for batch in zip(*[iter(take(sampler, 9))] * 3)]
    for e, order in enumerate(epochs):
        assert order == torch.randperm(12, generator=torch.Generator().manual_seed(5 + e)).tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    assert take(MegatronBatchSampler(12, 0, 4, 0, 1, shuffle=True, seed=5), 9) == take(
        MegatronBatchSampler(12, 0, 4, 0, 1, shuffle=True, seed=5), 9
    )
    assert take(MegatronBatchSampler(12, 0, 4, 0, 1, shuffle=True, seed=6), 3) != take(
        MegatronBatchSampler(12, 0, 4, 0, 1, shuffle=True, seed=5), 3
    )


def test_epoch_batches_for_validation():
    sampler = MegatronBatchSampler(10, 7, 4, 1, 2, drop_last=False)
    assert list(sampler.epoch_batches()) == [[2, 3], [6, 7], [9]]
    assert sampler.consumed_samples == 7
    shuffled = MegatronBatchSampler(10, 0, 4, 0, 1, shuffle=True, seed=2)
    assert sum(shuffled.epoch_batches(epoch=1), []) == shuffled.epoch_order(1)


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 0, 6, 0, 4), "global_batch_size 6 is not a positive multiple of the data-parallel size 4; set model.global_batch_size"),
        ((10, 0, 4, 2, 2), "data_parallel_rank 2 is outside [0, 2)"),
        ((10, -1, 4, 0, 2), "consumed_samples is -1"),
        ((0, 0, 4, 0, 2), "dataset has 0 samples"),
    ],
)
def test_argument_errors(args, message):
    with pytest.raises(ValueError) as err:
        MegatronBatchSampler(*args)
    assert message in str(err.value)
