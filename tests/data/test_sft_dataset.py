import json
import re

import pytest
import torch

from nemo_aligner.data.datasets import DataError, SFTDataset, make_padding_sample, read_jsonl, sft_collate

from helpers import CharTokenizer

TOK = CharTokenizer()


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def ids(text):
    return TOK.text_to_ids(text)


def test_read_jsonl_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"a": 1}, "", "   ", {"b": 2}])
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": 2})]


def test_sft_layout_is_shifted_with_loss_on_response_and_eos(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"input": "ab", "output": "cd"}])
    item = SFTDataset(path, TOK, 64, prompt_template="Q:{input}\n")[0]
    full = ids("Q:ab\ncd") + [2]  # 5 prompt tokens, 2 response tokens, eos
    assert item["tokens"].tolist() == full[:-1]
    assert item["labels"].tolist() == full[1:]
    assert item["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]  # labels 'c', 'd', eos
    assert item["position_ids"].tolist() == list(range(7))
    assert all(item[k].dtype == torch.long for k in item)

    with_bos = SFTDataset(path, TOK, 64, prompt_template="Q:{input}\n", add_bos=True, add_eos=False)
    item = with_bos[0]
    assert item["tokens"].tolist() == [1] + ids("Q:ab\nc")
    assert item["labels"].tolist() == ids("Q:ab\ncd")
    assert item["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert with_bos.lengths == [7]


def test_chat_masking_trains_only_assistant_turns(tmp_path):
    chat = {
        "system": "S",
        "conversations": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ok"},
        ],
    }
    dataset = SFTDataset(write_lines(tmp_path / "c.jsonl", [{"input": "x", "output": "y"}, chat]), TOK, 256)
    item = dataset[1]
    text = "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n<|user|>\nbye<|end|>\n<|assistant|>\nok<|end|>"
    assert item["tokens"].tolist() + [item["labels"][-1].item()] == ids(text) + [2]
    trained = item["labels"][item["loss_mask"].bool()].tolist()
    assert trained == ids("yo<|end|>ok<|end|>") + [2]
    # the trained positions are exactly the assistant replies, their end markers and the eos
    first = text.index("yo<|end|>")
    assert item["loss_mask"].tolist()[first - 1 : first - 1 + len("yo<|end|>")] == [1] * len("yo<|end|>")
    assert len(dataset) == 2 and dataset.lengths == [len("x\n\ny"), len(text)]


LONG = {"input": "abcdef", "output": "xyz"}  # "abcdef\n\nxyz" + eos = 12 tokens


def test_truncation_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}, LONG])
    with pytest.raises(DataError) as err:
        SFTDataset(path, TOK, 10)
    message = str(err.value)
    assert message.startswith(f"{path}:2: sample has 12 tokens, more than max_seq_length 10;")
    assert "model.data.truncation=truncate" in message and "model.data.truncation=drop" in message


def test_truncation_truncate(tmp_path):
    prompt_only_fits = {"input": "abcdefghi", "output": "z"}  # response starts at token 12 of 10
    path = write_lines(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}, LONG, prompt_only_fits])
    dataset = SFTDataset(path, TOK, 10, truncation="truncate")
    assert (len(dataset), dataset.num_truncated, dataset.num_dropped) == (2, 1, 1)
    item = dataset[1]
    assert item["tokens"].tolist() == ids("abcdef\n\nx")
    assert item["labels"].tolist() == ids("bcdef\n\nxy")
    assert item["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert dataset.lengths == [4, 9]


def test_truncation_drop(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [LONG, {"input": "a", "output": "b"}, LONG])
    dataset = SFTDataset(path, TOK, 12 - 1, truncation="drop")
    assert (len(dataset), dataset.num_truncated, dataset.num_dropped) == (1, 0, 2)
    assert dataset[0]["tokens"].tolist() == ids("a\n\nb")
    assert len(SFTDataset(path, TOK, 12, truncation="drop")) == 3  # exactly max_seq_length fits


def test_all_dropped_is_an_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [LONG])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no samples left: all 1 are longer than max_seq_length 5;")):
        SFTDataset(path, TOK, 5, truncation="drop")


@pytest.mark.parametrize(
    "lines, line_no, what",
    [
        (['{"input": "a", "output": "b"}', "", '{"input": "a", "output": '], 3, "invalid JSON"),
        (['{"input": "a", "output": "b"}', '["input", "output"]'], 2, "expected a JSON object, got list"),
        ([{"input": "a", "output": "b"}, {"input": "a"}], 2, "missing field 'output' (SFT lines need 'input' and 'output', or 'conversations')"),
        ([{"prompt": "a"}], 1, "missing field 'input'"),
        ([{"input": 7, "output": "b"}], 1, "field 'input' must be a string, got int"),
        ([{"input": "a", "output": None}], 1, "field 'output' must be a string, got NoneType"),
        ([{"conversations": {"from": "gpt"}}], 1, "field 'conversations' must be a non-empty list of turns, got dict"),
        ([{"conversations": [{"from": "user", "value": "q"}]}], 1, "has no assistant turn"),
        ([{"input": "", "output": ""}], 1, "nothing to train on"),
        ([], 1, "file has no samples"),
        (["", "  "], 1, "file has no samples"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, lines, line_no, what):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        SFTDataset(path, TOK, 64, prompt_template="{input}")
    message = str(err.value)
    assert message.startswith(f"{path}:{line_no}: ") and what in message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


def test_bad_arguments(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        SFTDataset(tmp_path / "nope.jsonl", TOK, 64)
    with pytest.raises(ValueError, match="truncation='cut'"):
        SFTDataset(path, TOK, 64, truncation="cut")
    with pytest.raises(ValueError, match="has no '\\{input\\}'"):
        SFTDataset(path, TOK, 64, prompt_template="Q:")


def test_collate_unpacked():
    a = {"tokens": torch.tensor([5, 6, 7]), "labels": torch.tensor([6, 7, 8]), "loss_mask": torch.tensor([0, 1, 1]), "position_ids": torch.arange(3)}
    b = {"tokens": torch.tensor([9]), "labels": torch.tensor([10]), "loss_mask": torch.tensor([1]), "position_ids": torch.arange(1)}
    batch = sft_collate([a, b], pad_id=0, pad_to_multiple_of=4)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0]]
    assert sft_collate([a, b], pad_id=3, pad_to=5)["tokens"].tolist() == [[5, 6, 7, 3, 3], [9, 3, 3, 3, 3]]
    assert sft_collate([a, b], pad_id=3, pad_to=5, pad_to_multiple_of=4)["tokens"].shape == (2, 8)
    with pytest.raises(ValueError, match="pad_to=2 is shorter than the longest sample"):
        sft_collate([a, b], pad_id=0, pad_to=2)


def packed(seq_lens):
    n = sum(seq_lens)
    return {
        "tokens": torch.arange(10, 10 + n),
        "labels": torch.arange(11, 11 + n),
        "loss_mask": torch.ones(n, dtype=torch.long),
        "position_ids": torch.cat([torch.arange(k) for k in seq_lens]),
        "seq_lens": torch.tensor(seq_lens),
    }


def test_collate_packed_cu_seqlens():
    batch = sft_collate([packed([3, 3]), packed([4]), packed([1, 2])], pad_id=0)
    # rows of 6 tokens: [3 | 3], [4 | pad 2], [1 | 2 | pad 3]
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 10, 12, 13, 15, 18]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 4
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0], [0, 0, 1, 0, 0, 0]]
    batch = sft_collate([packed([2])], pad_id=0, pad_to=8)
    assert batch["cu_seqlens"].tolist() == [0, 2, 8] and batch["max_seqlen"] == 6
    unpacked = {k: v for k, v in packed([2]).items() if k != "seq_lens"}
    with pytest.raises(ValueError, match="packed and unpacked"):
        sft_collate([packed([2]), unpacked], pad_id=0)


def test_make_padding_sample():
    like = packed([2, 3])
    pad = make_padding_sample(like)
    assert set(pad) == set(like)
    assert pad["loss_mask"].tolist() == [0] * 5 and like["loss_mask"].tolist() == [1] * 5
    for key in ("tokens", "labels", "position_ids", "seq_lens"):
        assert torch.equal(pad[key], like[key])
