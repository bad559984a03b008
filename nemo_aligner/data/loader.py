"""Turn a sampler's per-step indices into the micro-batches one optimizer step consumes.

Each step, this data-parallel rank owns ``global_batch_size / dp`` samples, cut into
``micro_batch_size`` pieces (or, for micro-batches packed into one row, runs of samples that
fit in a token budget: :func:`token_budget_chunks`). With pipeline parallelism every micro-batch of a step
is padded to the same length (the longest sample of the step, rounded up to
``pad_to_multiple_of``), because pipeline stages exchange activations of one fixed shape per
step; without it (``uniform_width=False``) each micro-batch is padded to its own longest
sample only: a short last micro-batch of a step does not pay for the step's widest row (its
padding goes through every layer, attention included). A final partial batch is topped
up with padding samples whose loss mask is zero, so every rank runs the same number of
micro-batches and the loss (a sum over real tokens) is unchanged.
"""

from dataclasses import dataclass

from nemo_aligner.data.datasets import make_padding_sample


@dataclass
class StepBatch:
    micro_batches: list  # collated dicts, padded to `seq_length` (or each to its own width)
    seq_length: int  # the widest micro-batch's width
    num_samples: int  # real samples on this rank (the rest are padding)


class StepLoader:
    """Iterable of :class:`StepBatch` for one data-parallel rank.

    ``collate_fn(samples, pad_to=...)`` batches a list of dataset items.
    ``sample_length(item)`` gives the length that must fit (default: ``len(tokens)``);
    ``row_length(items)``, when given, the row width a whole micro-batch needs instead (a
    collate that packs a micro-batch into one row).
    ``padding_sample(item)`` makes a filler like ``item`` that carries no loss (default:
    :func:`~nemo_aligner.data.datasets.make_padding_sample`).
    ``token_budget`` (with ``row_length``): micro-batches are the runs of samples whose row fits
    in that many tokens, instead of ``micro_batch_size`` samples each. With ``row_length``, the
    samples per rank need not be a multiple of ``micro_batch_size``.
    ``uniform_width``: every micro-batch of a step padded to the step's widest (pipeline
    parallelism needs it); otherwise each to its own widest (see the module docstring).
    """

    def __init__(
        self,
        dataset,
        sampler,
        micro_batch_size: int,
        collate_fn,
        pad_to_multiple_of: int = 8,
        sample_length=None,
        padding_sample=make_padding_sample,
        row_length=None,
        token_budget=None,
        uniform_width: bool = True,
    ):
        per_rank = sampler.global_batch_size // sampler.data_parallel_size
        # One-row micro-batches hold however many samples fit (the last one of a step may hold
        # fewer): micro_batch_size then only sizes the budget, and need not divide the batch.
        if row_length is None and per_rank % micro_batch_size != 0:
            raise ValueError(
                f"global_batch_size ({sampler.global_batch_size}) / data-parallel size "
                f"({sampler.data_parallel_size}) = {per_rank} is not a multiple of "
                f"micro_batch_size ({micro_batch_size}); adjust model.global_batch_size"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.per_rank = per_rank
        self.collate_fn = collate_fn
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sample_length = sample_length or (lambda item: len(item["tokens"]))
        self.padding_sample = padding_sample
        self.row_length = row_length
        self.token_budget = token_budget if row_length is not None else None
        self.uniform_width = uniform_width

    def make_step(self, indices) -> StepBatch:
        items = [self.dataset[i] for i in indices]
        num_real = len(items)
        template = items[0] if items else self.dataset[0]
        items += [self.padding_sample(template) for _ in range(self.per_rank - num_real)]
        chunks = self.chunks(items)
        if self.row_length is not None:
            widths = [self.row_length(chunk) for chunk in chunks]
        else:
            widths = [max(self.sample_length(item) for item in chunk) for chunk in chunks]
        if self.uniform_width:
            widths = [max(widths)] * len(widths)
        m = self.pad_to_multiple_of
        widths = [-(-w // m) * m for w in widths]
        micro = [self.collate_fn(chunk, pad_to=w) for chunk, w in zip(chunks, widths)]
        return StepBatch(micro_batches=micro, seq_length=max(widths), num_samples=num_real)

    def chunks(self, items: list) -> list[list]:
        """``items`` cut into micro-batches, in order."""
        if self.token_budget is not None:
            return token_budget_chunks(items, self.row_length, self.token_budget)
        mbs = self.micro_batch_size
        return [items[i : i + mbs] for i in range(0, len(items), mbs)]

    def __iter__(self):
        for indices in self.sampler:
            yield self.make_step(indices)

    def epoch(self, epoch: int = 0, limit_batches=None):
        """One pass in order (for validation); ``limit_batches`` caps the number of steps."""
        for n, indices in enumerate(self.sampler.epoch_batches(epoch)):
            if limit_batches is not None and n >= limit_batches:
                return
            yield self.make_step(indices)


def token_budget_chunks(items: list, row_length, budget: int) -> list[list]:
    """``items`` cut, in order, into the longest runs whose ``row_length(run)`` is at most
    ``budget`` tokens (an item longer than the budget alone is a run of its own).
    ``row_length`` must add up over items (a run's row is its items' rows back to back, as
    :func:`~nemo_aligner.data.preference.merged_length`): each item's width is taken once.

    For micro-batches packed into one row: the loss is a sum over samples, so how a step is
    cut changes no result, but each micro-batch costs a fixed forward and backward overhead
    (tens of ops per layer) besides its arithmetic. Short samples fill a row of the budget
    instead of leaving it mostly empty at ``micro_batch_size`` samples.
    """
    chunks, current, width = [], [], 0
    for item in items:
        item_width = row_length([item])
        if current and width + item_width > budget:
            chunks.append(current)
            current, width = [], 0
        current.append(item)
        width += item_width
    if current:
        chunks.append(current)
    return chunks
