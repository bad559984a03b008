"""Sequence packing: several samples share one row of ``pack_size`` tokens.

Bin packing algorithms return bins of sample indices whose total length is at most
``pack_size``. :class:`PackedDataset` concatenates each bin's (already shifted) samples;
:func:`~nemo_aligner.data.datasets.sft_collate` turns its ``seq_lens`` into ``cu_seqlens``
so attention never crosses a sample boundary.
"""

import json
import random

import torch

PACKING_ALGORITHMS = ("first_fit_decreasing", "first_fit_shuffle")
_PACKED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def first_fit(lengths: list[int], order: list[int], pack_size: int) -> list[list[int]]:
    """First-fit bin packing: visit samples in ``order``; put each into the first (lowest
    numbered) bin with room, opening a new bin when none has.

    O(n log n): a max segment tree over the remaining capacity of n potential bins finds
    the leftmost bin with room (bins not opened yet have full capacity, so the leftmost
    fitting bin is either an open one or the next new one).
    """
    for i in order:
        if lengths[i] > pack_size:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than pack_size {pack_size}; raise pack_size or lower max_seq_length")
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = [pack_size] * (2 * size)  # room[size + b] is bin b's free space; inner nodes hold the max below
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node and room[node] != max(room[2 * node], room[2 * node + 1]):
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def first_fit_decreasing(lengths: list[int], pack_size: int) -> list[list[int]]:
    """First fit over samples sorted longest first (ties by index): dense packs, but the
    packs come out grouped by sample length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return first_fit(lengths, order, pack_size)


def first_fit_shuffle(lengths: list[int], pack_size: int, seed: int) -> list[list[int]]:
    """First fit over samples in a random order (``random.Random(seed)``): packs mix lengths
    at a small cost in density."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return first_fit(lengths, order, pack_size)


class PackedDataset(torch.utils.data.Dataset):
    """Packs of samples from an SFT-like ``dataset`` (items with shifted ``tokens``,
    ``labels``, ``loss_mask``, ``position_ids`` and a ``lengths`` attribute).

    Item ``j`` concatenates the samples of bin ``j``; ``position_ids`` restart at 0 for each
    sample and ``seq_lens`` (1-D LongTensor) holds each sample's length. Since every sample
    was shifted on its own, no label crosses a sample boundary.

    The bins come from ``algorithm`` (one of :data:`PACKING_ALGORITHMS`) or, when ``bins``
    is given, are used as is after checking that they cover every sample exactly once and
    fit ``pack_size``.

    ``packing_efficiency`` is real tokens / (number of packs * ``pack_size``).
    """

    packing_script = "prepare_packed_sft_dataset.py"  # named in the error of a stale packs file

    def __init__(self, dataset, pack_size: int, algorithm: str = "first_fit_shuffle", seed: int = 1234, bins=None,
                 check_bins: bool = True):
        self.dataset = dataset
        self.lengths = self.item_lengths(dataset)
        if bins is None:
            if algorithm == "first_fit_decreasing":
                bins = first_fit_decreasing(self.lengths, pack_size)
            elif algorithm == "first_fit_shuffle":
                bins = first_fit_shuffle(self.lengths, pack_size, seed)
            else:
                raise ValueError(f"packing algorithm {algorithm!r} is unknown; use one of {PACKING_ALGORITHMS}")
        self.pack_size = pack_size
        self.bins = [list(map(int, b)) for b in bins]
        if check_bins:
            self._check_bins()
        self.packing_efficiency = sum(self.lengths) / (len(self.bins) * pack_size)

    def item_lengths(self, dataset) -> list[int]:
        """Tokens each sample takes in a pack."""
        return list(dataset.lengths)

    @classmethod
    def from_bins(cls, dataset, bins: list[list[int]], pack_size: int, **kwargs) -> "PackedDataset":
        """Pack ``dataset`` with precomputed ``bins``."""
        return cls(dataset, pack_size, bins=bins, **kwargs)

    @classmethod
    def from_file(cls, dataset, path: str, **kwargs) -> "PackedDataset":
        """Pack ``dataset`` with the bins saved by :meth:`save` (for instance by
        ``examples/nlp/data/prepare_packed_sft_dataset.py``). Raises ``ValueError`` when the
        file was made for samples of other lengths."""
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        packed = cls.from_bins(dataset, saved["bins"], saved["pack_size"], check_bins=False, **kwargs)
        if saved["lengths"] != packed.lengths:
            raise ValueError(
                f"{path}: the packs were computed for other samples ({len(saved['lengths'])} samples saved, "
                f"{len(packed.lengths)} now, or other lengths); re-run {cls.packing_script} "
                "with the same data, tokenizer, max_seq_length and packing options"
            )
        packed._check_bins()
        return packed

    def save(self, path: str) -> None:
        """Write ``{"pack_size", "lengths", "bins"}`` as JSON, for :meth:`from_file`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"pack_size": self.pack_size, "lengths": self.lengths, "bins": self.bins}, f)

    def _check_bins(self) -> None:
        lengths = self.lengths
        seen = [0] * len(lengths)
        for j, b in enumerate(self.bins):
            if not b:
                raise ValueError(f"pack {j} is empty")
            if any(not 0 <= i < len(lengths) for i in b):
                raise ValueError(f"pack {j} refers to a sample outside the dataset of {len(lengths)} samples")
            total = sum(lengths[i] for i in b)
            if total > self.pack_size:
                raise ValueError(f"pack {j} holds {total} tokens, more than pack_size {self.pack_size}")
            for i in b:
                seen[i] += 1
        if any(count != 1 for count in seen):
            raise ValueError("the packs must hold every sample exactly once")

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in self.bins[j]]
        pack = {key: torch.cat([x[key] for x in items]) for key in _PACKED_KEYS}
        pack["seq_lens"] = torch.tensor([len(x["tokens"]) for x in items], dtype=torch.long)
        return pack
