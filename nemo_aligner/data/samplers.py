"""Megatron-style batch sampler that resumes exactly from ``consumed_samples``."""

import torch


class MegatronBatchSampler:
    """Yields, for each global batch (one optimizer step), this data-parallel rank's
    dataset indices.

    An epoch visits ``samples_per_epoch`` samples: all ``total_samples`` when
    ``drop_last=False``, else ``total_samples`` rounded down to a multiple of
    ``global_batch_size``. Epoch ``e`` visits ``0..N-1`` in order, or with ``shuffle`` the
    permutation ``torch.randperm(total_samples)`` drawn from a generator seeded with
    ``seed + e`` (with ``drop_last`` the tail of that permutation is skipped).

    Each global batch is the next ``global_batch_size`` indices of the epoch (fewer for the
    last batch of an epoch when ``drop_last=False``); it is split into
    ``data_parallel_size`` contiguous chunks of ``ceil(n / data_parallel_size)`` and rank
    ``r`` gets chunk ``r`` (possibly short or empty in a partial batch). The global batch
    is thus the same for every data-parallel size.

    Iterating continues across epochs forever, starting at ``consumed_samples`` (epoch
    ``consumed_samples // samples_per_epoch``, resumed mid-epoch), and advances the
    ``consumed_samples`` attribute by the global batch's real size as each batch is
    yielded. :meth:`epoch_batches` yields one epoch for validation.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        global_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
        shuffle: bool = False,
        seed: int = 1234,
    ):
        if total_samples <= 0:
            raise ValueError(f"dataset has {total_samples} samples; it needs at least one")
        if global_batch_size <= 0 or global_batch_size % data_parallel_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a positive multiple of the data-parallel size "
                f"{data_parallel_size}; set model.global_batch_size to a multiple of {data_parallel_size}"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples is {consumed_samples}; it cannot be negative")
        if drop_last and total_samples < global_batch_size:
            raise ValueError(
                f"dataset has {total_samples} samples, fewer than global_batch_size {global_batch_size}; "
                "lower model.global_batch_size or set model.data.drop_last=false"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        if drop_last:
            self.samples_per_epoch = total_samples - total_samples % global_batch_size
        else:
            self.samples_per_epoch = total_samples
        self.steps_per_epoch = -(-self.samples_per_epoch // global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The indices epoch ``epoch`` visits, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.total_samples, generator=generator).tolist()
        else:
            order = list(range(self.total_samples))
        return order[: self.samples_per_epoch]

    def rank_chunk(self, global_batch: list[int]) -> list[int]:
        """This rank's contiguous share of ``global_batch``."""
        chunk = -(-len(global_batch) // self.data_parallel_size)
        return global_batch[self.data_parallel_rank * chunk : (self.data_parallel_rank + 1) * chunk]

    def _global_batches(self, epoch: int, start: int):
        order = self.epoch_order(epoch)
        for begin in range(start, len(order), self.global_batch_size):
            yield order[begin : begin + self.global_batch_size]

    def __iter__(self):
        while True:
            epoch, start = divmod(self.consumed_samples, self.samples_per_epoch)
            for global_batch in self._global_batches(epoch, start):
                self.consumed_samples += len(global_batch)
                yield self.rank_chunk(global_batch)

    def epoch_batches(self, epoch: int = 0):
        """This rank's batches of one whole epoch (``consumed_samples`` is left alone)."""
        for global_batch in self._global_batches(epoch, 0):
            yield self.rank_chunk(global_batch)
