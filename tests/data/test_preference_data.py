"""Preference, regression, KTO and scoring datasets; group collate and packing layout."""

import json

import pytest
import torch

from nemo_aligner.data.datasets import SFTDataset
from nemo_aligner.data.errors import DataError
from nemo_aligner.data.preference import (
    KTODataset,
    PackedGroupDataset,
    PreferenceDataset,
    RegressionRewardDataset,
    RewardScoringDataset,
    group_collate,
    group_length,
    padding_group,
    render_prompt_response,
)
from nemo_aligner.data.templates import END_OF_TURN

from helpers import CharTokenizer

TOK = CharTokenizer()


def ids(text):
    return TOK.text_to_ids(text)


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def pair(prompt="Q:", chosen="ab", rejected="c", **extra):
    return {"prompt": prompt, "chosen_response": chosen, "rejected_response": rejected, **extra}


def test_pair_layout_shifted_with_mask_on_response_and_eos(tmp_path):
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", [pair()]), TOK, 16)
    item = ds[0]
    chosen, rejected = item["sequences"]
    full_c = ids("Q:ab") + [2]
    assert chosen["tokens"].tolist() == full_c[:-1] and chosen["labels"].tolist() == full_c[1:]
    assert chosen["loss_mask"].tolist() == [0, 1, 1, 1]  # labels 'a', 'b', eos
    assert rejected["loss_mask"].tolist() == [0, 1, 1]
    assert ds.lengths == [4 + 3]
    assert torch.isnan(item["gt_rewards"]).all() and torch.isnan(item["ref_logps"]).all()
    unshifted = PreferenceDataset(tmp_path / "p.jsonl", TOK, 16, shift=False)[0]["sequences"][0]
    assert unshifted["tokens"].tolist() == full_c and unshifted["loss_mask"].tolist() == [0, 0, 1, 1, 1]


def test_message_list_prompt_renders_through_the_chat_template(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt, response, closed = render_prompt_response(messages, {"role": "assistant", "content": "Yo"}, "chosen_response")
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert response == "Yo" + END_OF_TURN and not closed
    assert render_prompt_response(messages, [{"role": "assistant", "content": "Yo"}]) == (prompt, response, False)
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", [pair(messages, "Yo", [{"role": "assistant", "content": "No"}])]), TOK, 128)
    chosen = ds[0]["sequences"][0]
    n_prompt = len(ids(prompt))
    assert chosen["loss_mask"].tolist() == [0] * (n_prompt - 1) + [1] * (len(ids(response)) + 1)


def test_gt_rewards_margin_and_requirements(tmp_path):
    path = write(tmp_path / "p.jsonl", [pair(chosen_reward=3, rejected_reward=1), pair(margin=2.5)])
    ds = PreferenceDataset(path, TOK, 16)
    assert ds[0]["gt_rewards"].tolist() == [3.0, 1.0] and ds[0]["margin"].tolist() == [2.0]
    assert ds[1]["margin"].tolist() == [2.5]
    with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'chosen_reward'"):
        PreferenceDataset(path, TOK, 16, require_gt_rewards=True)
    path = write(tmp_path / "m.jsonl", [pair(margin=1), pair()])
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'margin'"):
        PreferenceDataset(path, TOK, 16, require_margin=True)


@pytest.mark.parametrize("line,needle", [
    ({"prompt": "a", "chosen_response": "b"}, ":1: missing field 'rejected_response'"),
    ({"prompt": "a", "chosen_response": 3, "rejected_response": "b"}, ":1: field 'chosen_response' must be a string"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen_response": "b", "rejected_response": "c"}, ":1: prompt[0].role"),
    (pair(chosen_reward="high"), ":1: field 'chosen_reward' must be a number"),
    (pair(chosen=""), None),  # an empty response still has its EOS to score: fine
])
def test_bad_pairs_name_file_line_and_field(tmp_path, line, needle):
    path = write(tmp_path / "p.jsonl", [line])
    if needle is None:
        assert len(PreferenceDataset(path, TOK, 16)) == 1
        return
    with pytest.raises(DataError) as e:
        PreferenceDataset(path, TOK, 16)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_truncation_policies_are_counted(tmp_path):
    path = write(tmp_path / "p.jsonl", [pair(chosen="x" * 20), pair(), pair(prompt="P" * 12)])
    with pytest.raises(DataError, match=r"p.jsonl:1: 'chosen_response' gives 23 tokens .* max_seq_length 10; .*truncation"):
        PreferenceDataset(path, TOK, 10)
    dropped = PreferenceDataset(path, TOK, 10, truncation="drop")
    assert len(dropped) == 1 and dropped.num_dropped == 2 and dropped.num_truncated == 0
    cut = PreferenceDataset(path, TOK, 10, truncation="truncate")
    # line 1 is cut to 10 tokens; line 3's prompt (12 tokens) leaves no room: dropped
    assert len(cut) == 2 and cut.num_truncated == 1 and cut.num_dropped == 1
    assert len(cut[0]["sequences"][0]["tokens"]) == 9
    with pytest.raises(DataError, match="no samples left"):
        PreferenceDataset(write(tmp_path / "long.jsonl", [pair(chosen="x" * 20)]), TOK, 10, truncation="drop")


def test_regression_dataset_and_label_errors(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"text": "abc", "label": [1, -100, None]}])
    ds = RegressionRewardDataset(path, TOK, 16, num_attributes=3)
    item = ds[0]
    assert item["sequences"][0]["tokens"].tolist() == ids("abc") + [2]
    assert item["attribute_labels"].tolist() == [[1.0, -100.0, -100.0]]
    with pytest.raises(DataError) as e:
        RegressionRewardDataset(path, TOK, 16, num_attributes=2)
    assert f"{path}:1: field 'label' has 3 values but model.num_attributes is 2" in str(e.value)
    bad = write(tmp_path / "b.jsonl", [{"text": "a", "label": [1, "x"]}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'label\[1\]' must be a number"):
        RegressionRewardDataset(bad, TOK, 16, num_attributes=2)


def test_kto_dataset_pairs_each_sample_with_a_mismatched_response(tmp_path):
    lines = [{"prompt": f"P{i}:", "response": "r" * (i + 1), "preference": i % 2 == 0} for i in range(6)]
    ds = KTODataset(write(tmp_path / "k.jsonl", lines), TOK, 32, seed=3)
    partners = ds.kl_partner
    assert sorted(partners) == list(range(6)) and all(p != i for i, p in enumerate(partners))
    for i in range(6):
        own, kl = ds[i]["sequences"]
        j = partners[i]
        assert own["tokens"].tolist() == ids(f"P{i}:" + "r" * (i + 1))
        assert kl["tokens"].tolist() == ids(f"P{i}:" + "r" * (j + 1))  # eos is the last label
        assert kl["loss_mask"].sum().item() == j + 2
    assert ds.desirable.tolist() == [1, 0, 1, 0, 1, 0]
    with pytest.raises(DataError, match=r"k2.jsonl:1: field 'preference'"):
        KTODataset(write(tmp_path / "k2.jsonl", [{"prompt": "a", "response": "b", "preference": "maybe"}]), TOK, 32)


def test_scoring_dataset_accepts_three_forms(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"text": "ab", "id": 7}, {"prompt": "Q:", "response": "a"}, pair()])
    ds = RewardScoringDataset(path, TOK, 16)
    assert ds.kinds == ["single", "single", "pair"] and ds.lines[0]["id"] == 7
    assert [len(ds[i]["sequences"]) for i in range(3)] == [1, 1, 2]
    assert ds[1]["sequences"][0]["tokens"].tolist() == ids("Q:a") + [2]
    with pytest.raises(DataError, match=r"s2.jsonl:1: missing field 'response'"):
        RewardScoringDataset(write(tmp_path / "s2.jsonl", [{"prompt": "Q"}]), TOK, 16)


def test_group_collate_unpacked_and_packed_index_the_same_sequences(tmp_path):
    lines = [pair("Q:", "a" * k, "b" * (k + 2)) for k in (1, 4, 2)]
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", lines), TOK, 16)
    groups = [ds[i] for i in range(3)]
    flat = group_collate(groups, pad_id=0, pad_to=16)
    assert flat["tokens"].shape == (6, 16) and "cu_seqlens" not in flat
    lengths = [len(s["tokens"]) for g in groups for s in g["sequences"]]
    assert flat["last_index"].tolist() == [r * 16 + n - 1 for r, n in enumerate(lengths)]
    assert flat["seq_ids"][2, : lengths[2]].eq(2).all() and flat["seq_ids"][2, lengths[2]:].eq(-1).all()
    assert flat["sample_ids"].tolist() == [0, 1, 2] and flat["weight"].tolist() == [1, 1, 1]

    packed_ds = PackedGroupDataset.from_bins(ds, [[2, 0], [1]], pack_size=32)
    packs = [packed_ds[0], packed_ds[1]]
    assert group_length(packs[0]) == ds.lengths[2] + ds.lengths[0]
    batch = group_collate(packs, pad_id=0, pad_to=32)
    assert batch["sample_ids"].tolist() == [2, 0, 1]
    assert batch["cu_seqlens"][-1].item() == 64
    # The same tokens per sequence in the same order (sequence k of the packed batch is
    # sample_ids[k // 2]'s chosen or rejected).
    order = [4, 5, 0, 1, 2, 3]  # flat rows of samples 2, 0, 1
    for k, row in enumerate(order):
        got = batch["tokens"].reshape(-1)[batch["seq_ids"].reshape(-1) == k]
        assert got.tolist() == flat["tokens"][row, : lengths[row]].tolist()
        assert batch["tokens"].reshape(-1)[batch["last_index"][k]] == flat["tokens"].reshape(-1)[flat["last_index"][row]]


def test_shared_prompt_packs_hold_the_rejected_response_as_a_continuation(tmp_path):
    lines = [pair("Q::", "a" * k, "b" * (k + 2)) for k in (1, 3)]
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", lines), TOK, 16)
    assert ds.shared == [2, 2]  # the prompt's first two tokens; its last predicts the response
    packs = PackedGroupDataset.from_bins(ds, [[1, 0]], pack_size=32, share_prefix=True)
    assert packs.lengths == [n - 2 for n in ds.lengths]
    rejected = ds[1]["sequences"][1]
    shared = packs[0]["sequences"][1]
    assert shared["prefix_len"] == 2
    for key in ("tokens", "labels", "loss_mask"):
        assert shared[key].tolist() == rejected[key][2:].tolist()
    assert shared["position_ids"].tolist() == list(range(2, len(rejected["tokens"])))
    assert rejected["loss_mask"][:2].sum() == 0  # what is dropped scores nothing
    batch = group_collate([packs[0]], pad_id=0, pad_to=32)
    assert batch["prefix_lens"].tolist() == [0, 2, 0, 2, 0]
    # Unshifted (reward-model) sequences share nothing: a reward reads every token it is given.
    assert PreferenceDataset(write(tmp_path / "r.jsonl", lines), TOK, 16, shift=False).shared == [0, 0]


def test_padding_group_carries_no_loss_and_no_nan(tmp_path):
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", [pair()]), TOK, 16)
    pad = padding_group(ds[0])
    assert pad["weight"].tolist() == [0.0]
    assert all(s["loss_mask"].sum() == 0 for s in pad["sequences"])
    assert not torch.isnan(pad["ref_logps"]).any() and not torch.isnan(pad["gt_rewards"]).any()
    assert ds[0]["weight"].tolist() == [1.0]  # the original is untouched


def test_stale_packs_file_names_the_dpo_script(tmp_path):
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", [pair(), pair(chosen="abcd")]), TOK, 16)
    packs = PackedGroupDataset(ds, 32, algorithm="first_fit_decreasing")
    packs.save(tmp_path / "packs.json")
    assert PackedGroupDataset.from_file(ds, tmp_path / "packs.json").bins == packs.bins
    other = PreferenceDataset(write(tmp_path / "q.jsonl", [pair(), pair(chosen="abcdef")]), TOK, 16)
    with pytest.raises(ValueError, match="prepare_packed_dpo_dataset.py"):
        PackedGroupDataset.from_file(other, tmp_path / "packs.json")
    with pytest.raises(ValueError, match="packing options"):  # packed without sharing, loaded with it
        PackedGroupDataset.from_file(ds, tmp_path / "packs.json", share_prefix=True)


CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_message_prompts_use_the_tokenizers_hf_chat_template(tmp_path):
    """With a Hugging Face chat template the pair renders as transformers renders it, the
    response is the assistant turn as the template closes it, and no EOS is added."""
    from transformers import PreTrainedTokenizerFast

    from helpers import ROOT
    from nemo_aligner.data.tokenizers import load_tokenizer

    hf = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/quickstart/tokenizer.json"),
                                 bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.chat_template is not None
    messages = [{"role": "user", "content": "Repeat twice: owl"}]
    ds = PreferenceDataset(write(tmp_path / "p.jsonl", [pair(messages, "owl owl", "owl")]), tok, 64)
    chosen = ds[0]["sequences"][0]
    ids_full = chosen["tokens"].tolist() + chosen["labels"].tolist()[-1:]
    conversation = messages + [{"role": "assistant", "content": "owl owl"}]
    assert tok.ids_to_text(ids_full) == hf.apply_chat_template(conversation, tokenize=False)
    assert ids_full[-1] != tok.eos_id
    prompt_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok.text_to_ids(prompt_text))
    assert chosen["loss_mask"].tolist() == [0] * (n_prompt - 1) + [1] * (len(ids_full) - n_prompt)
    assert tok.ids_to_text(ids_full[n_prompt:]) == "owl owl<|im_end|>\n"


class NoSpecialTokens(CharTokenizer):
    bos_id = eos_id = None


@pytest.mark.parametrize("dataset", ["sft", "preference"])
@pytest.mark.parametrize("kwargs, needle", [
    ({"truncation": "cut", "add_eos": False}, r"truncation='cut'; use one of \('error', 'truncate', 'drop'\)"),
    ({"add_bos": True, "add_eos": False}, "add_bos=True but the tokenizer has no BOS token; set add_bos=False"),
    ({"add_eos": True}, "add_eos=True but the tokenizer has no EOS token; set add_eos=False"),
])
def test_tokenization_options_are_checked_before_reading(dataset, kwargs, needle, tmp_path):
    cls = SFTDataset if dataset == "sft" else PreferenceDataset
    missing = tmp_path / "never_read.jsonl"  # the options are checked before the file is opened
    with pytest.raises(ValueError, match=needle):
        cls(missing, NoSpecialTokens(), 16, **kwargs)
