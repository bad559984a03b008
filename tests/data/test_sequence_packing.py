import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from nemo_aligner.data.datasets import SFTDataset, sft_collate
from nemo_aligner.data.packing import PackedDataset, first_fit_decreasing, first_fit_shuffle
from nemo_aligner.data.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "data" / "quickstart"


def naive_first_fit(lengths, order, pack_size):
    bins, room = [], []
    for i in order:
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(pack_size)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_first_fit_decreasing_optimum():
    lengths = [2, 5, 4, 7, 1, 3, 8]  # 30 tokens: 3 full bins of 10 is optimal
    assert first_fit_decreasing(lengths, 10) == [[6, 0], [3, 5], [1, 2, 4]]
    assert first_fit_decreasing([6, 6, 4, 4], 10) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("pack_size", [16, 64, 1000])
def test_bins_valid_and_equal_to_naive_first_fit(pack_size):
    rng = random.Random(pack_size)
    lengths = [rng.randint(1, 16) for _ in range(1500)]
    for bins, order in [
        (first_fit_decreasing(lengths, pack_size), sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))),
        (first_fit_shuffle(lengths, pack_size, seed=7), None),
    ]:
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= pack_size for b in bins)
        if order is not None:
            assert bins == naive_first_fit(lengths, order, pack_size)
    shuffled_order = list(range(len(lengths)))
    random.Random(7).shuffle(shuffled_order)
    assert first_fit_shuffle(lengths, pack_size, seed=7) == naive_first_fit(lengths, shuffled_order, pack_size)


def test_first_fit_shuffle_seeded():
    lengths = [random.Random(0).randint(1, 9) for _ in range(200)]
    assert first_fit_shuffle(lengths, 20, seed=1) == first_fit_shuffle(lengths, 20, seed=1)
    assert first_fit_shuffle(lengths, 20, seed=1) != first_fit_shuffle(lengths, 20, seed=2)


def test_sample_longer_than_pack_is_an_error():
    with pytest.raises(ValueError, match="sample 2 has 11 tokens, more than pack_size 10"):
        first_fit_decreasing([3, 4, 11], 10)
    with pytest.raises(ValueError, match="sample 2 has 11 tokens"):
        first_fit_shuffle([3, 4, 11], 10, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QUICKSTART)


@pytest.fixture(scope="module")
def sft_path(tmp_path_factory):
    lines = (QUICKSTART / "sft_train.jsonl").read_text().splitlines()[:120]
    path = tmp_path_factory.mktemp("packing") / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(sft_path, tokenizer):
    return SFTDataset(sft_path, tokenizer, 64)


@pytest.mark.parametrize("algorithm", ["first_fit_decreasing", "first_fit_shuffle"])
def test_packed_item_is_concatenation(dataset, algorithm):
    packs = PackedDataset(dataset, 96, algorithm=algorithm, seed=3)
    assert sorted(i for b in packs.bins for i in b) == list(range(len(dataset)))
    assert packs.packing_efficiency == sum(dataset.lengths) / (len(packs) * 96)
    for j in range(len(packs)):
        pack, items = packs[j], [dataset[i] for i in packs.bins[j]]
        assert pack["seq_lens"].tolist() == [len(x["tokens"]) for x in items]
        assert len(pack["tokens"]) <= 96
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(pack[key], torch.cat([x[key] for x in items]))
        starts = torch.cumsum(pack["seq_lens"], 0) - pack["seq_lens"]
        assert pack["position_ids"][starts].tolist() == [0] * len(items)


def test_collated_packs_segment_every_sample(dataset, tokenizer):
    packs = PackedDataset(dataset, 96, algorithm="first_fit_decreasing")
    batch = sft_collate([packs[0], packs[1], packs[len(packs) - 1]], tokenizer.pad_id, pad_to=96)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 3 * 96 and all(a < b for a, b in zip(cu, cu[1:]))
    sample_lengths = [n for j in (0, 1, len(packs) - 1) for n in packs[j]["seq_lens"].tolist()]
    segments = [b - a for a, b in zip(cu, cu[1:])]
    real = [s for s, start in zip(segments, cu) if batch["loss_mask"].flatten()[start:start + s].any()]
    assert real == sample_lengths  # each sample trains, padding tails do not
    assert batch["max_seqlen"] == max(segments)
    assert (batch["position_ids"].flatten()[cu[:-1]] == 0).all()


def test_from_bins_validates(dataset):
    n = len(dataset)
    with pytest.raises(ValueError, match="exactly once"):
        PackedDataset.from_bins(dataset, [[i] for i in range(n - 1)], 64)
    with pytest.raises(ValueError, match="exactly once"):
        PackedDataset.from_bins(dataset, [[i] for i in range(n)] + [[0]], 64)
    with pytest.raises(ValueError, match=f"outside the dataset of {n} samples"):
        PackedDataset.from_bins(dataset, [[n]], 64)
    with pytest.raises(ValueError, match="pack 0 holds .* tokens, more than pack_size 64"):
        PackedDataset.from_bins(dataset, [list(range(n))], 64)
    with pytest.raises(ValueError, match="packing algorithm 'best_fit' is unknown"):
        PackedDataset(dataset, 64, algorithm="best_fit")


def test_prepare_script_and_from_file(tmp_path, sft_path, dataset, tokenizer, capsys):
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "examples/nlp/data/prepare_packed_sft_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "packs.json"
    script.main(["--input", str(sft_path), "--tokenizer", str(QUICKSTART), "--pack-size", "128",
                 "--max-seq-length", "64", "--algorithm", "first_fit_decreasing", "--output", str(out)])
    expected = PackedDataset(dataset, 128, algorithm="first_fit_decreasing")
    assert f"packing efficiency: {expected.packing_efficiency:.4f}" in capsys.readouterr().out
    loaded = PackedDataset.from_file(dataset, out)
    assert loaded.bins == expected.bins and loaded.pack_size == 128
    assert torch.equal(loaded[0]["tokens"], expected[0]["tokens"])

    saved = json.loads(out.read_text())
    saved["lengths"][0] += 1
    out.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="re-run prepare_packed_sft_dataset.py"):
        PackedDataset.from_file(dataset, out)


def test_collate_refuses_a_prefix_longer_than_the_previous_segment():
    sample = {"tokens": torch.arange(6), "labels": torch.arange(6), "loss_mask": torch.ones(6, dtype=torch.long),
              "position_ids": torch.tensor([0, 1, 2, 3, 1, 2]), "seq_lens": torch.tensor([4, 2]),
              "prefix_lens": torch.tensor([0, 1])}
    batch = sft_collate([sample], pad_id=0, pad_to=8)
    assert batch["prefix_lens"].tolist() == [0, 1, 0]  # the padding tail is a segment too
    with pytest.raises(ValueError, match="continues 5 tokens"):
        sft_collate([dict(sample, prefix_lens=torch.tensor([0, 5]))], pad_id=0)
    with pytest.raises(ValueError, match="segment 0"):
        sft_collate([dict(sample, prefix_lens=torch.tensor([1, 0]))], pad_id=0)
