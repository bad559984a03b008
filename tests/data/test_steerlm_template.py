"""NeMo's special-token template with SteerLM labels: the exact text and loss mask of
hand-written conversations (VALUE_TO_TEXT, TEXT_TO_VALUE, no type; custom tokens), the bad
input named by field and line, and the SFT dataset's tokens / mask for a SteerLM line."""

import json

import pytest

from helpers import CharTokenizer

from nemo_aligner.data.datasets import SFTDataset
from nemo_aligner.data.errors import DataError
from nemo_aligner.data.steerlm_template import chat_prompt_tokens, conditioned_prompt, render_segments

CONV = {
    "system": "Be brief.",
    "mask": "User",
    "conversations": [
        {"from": "User", "value": "Hi", "label": None},
        {"from": "Assistant", "value": "Hello", "label": "quality:4,verbosity:1"},
        {"from": "User", "value": "More", "label": None},
        {"from": "Assistant", "value": "Sure thing", "label": "quality:3,verbosity:2"},
    ],
}


def learned(segments):
    return [text for text, is_loss in segments if is_loss]


def test_value_to_text():
    seg = render_segments({**CONV, "type": "VALUE_TO_TEXT"})
    assert "".join(t for t, _ in seg) == (
        "<extra_id_0>System\nBe brief.\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:4,verbosity:1\nHello\n"
        "<extra_id_1>User\nMore\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:3,verbosity:2\nSure thing\n"
        "<extra_id_1>"
    )
    # Learned: each reply (after its name and label lines), the turn start that ends it.
    assert learned(seg) == ["Hello\n<extra_id_1>", "Sure thing\n<extra_id_1>"]


def test_text_to_value_learns_the_labels():
    seg = render_segments({**CONV, "type": "TEXT_TO_VALUE"})
    assert "".join(t for t, _ in seg) == (
        "<extra_id_0>System\nBe brief.\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\nHello\n<extra_id_2>quality:4,verbosity:1\n"
        "<extra_id_1>User\nMore\n"
        "<extra_id_1>Assistant\nSure thing\n<extra_id_2>quality:3,verbosity:2\n"
        "<extra_id_1>"
    )
    assert learned(seg) == ["quality:4,verbosity:1\n<extra_id_1>", "quality:3,verbosity:2\n<extra_id_1>"]


def test_no_type_and_a_user_last_turn():
    conv = {"system": "", "conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"},
                                            {"from": "User", "value": "c"}]}
    seg = render_segments(conv)
    assert "".join(t for t, _ in seg) == "<extra_id_0>System\n\n<extra_id_1>User\na\n<extra_id_1>Assistant\nb\n<extra_id_1>User\nc\n"
    assert learned(seg) == ["b\n<extra_id_1>"]  # the last (user) turn adds no final turn start


def test_first_turn_is_context_and_custom_tokens():
    tokens = chat_prompt_tokens({"turn_start": "<T>", "label_start": "<L>", "end_of_name": ": "})
    conv = {"mask": "Human", "type": "VALUE_TO_TEXT", "conversations": [
        {"from": "Bot", "value": "greeting", "label": "humor:2"},  # an opening reply: context only
        {"from": "Human", "value": "q"}, {"from": "Bot", "value": "a", "label": "humor:0"}]}
    seg = render_segments(conv, tokens)
    assert "".join(t for t, _ in seg) == "<extra_id_0>System: \n<T>Bot: <L>humor:2: greeting\n<T>Human: q\n<T>Bot: <L>humor:0: a\n<T>"
    assert learned(seg) == ["a\n<T>"]  # the second turn's turn start is context (NeMo: from the third turn on)
    with pytest.raises(ValueError, match="chat_prompt_tokens.turn_begin: unknown"):
        chat_prompt_tokens({"turn_begin": "x"})


def test_conditioned_prompt_is_the_training_text_up_to_the_reply():
    prompt = conditioned_prompt("Hi", "quality:4,verbosity:1", system="Be brief.")
    text = "".join(t for t, _ in render_segments({**CONV, "type": "VALUE_TO_TEXT", "conversations": CONV["conversations"][:2]}))
    assert text.startswith(prompt) and text[len(prompt):] == "Hello\n<extra_id_1>"


@pytest.mark.parametrize("line,needle", [
    ({**CONV, "type": "VALUE_TO_TEXT", "conversations": [CONV["conversations"][0], {**CONV["conversations"][1], "label": "quality=4"}]},
     r"conversations\[1\]\.label: malformed attribute label entry 'quality=4'"),
    ({**CONV, "type": "VALUE_TO_TEXT", "conversations": [CONV["conversations"][0], {**CONV["conversations"][1], "label": "wit:3"}]},
     r"conversations\[1\]\.label: unknown attribute 'wit'"),
    ({**CONV, "type": "TEXT_TO_LABEL"}, "field 'type' is 'TEXT_TO_LABEL'; use VALUE_TO_TEXT or TEXT_TO_VALUE"),
    ({**CONV, "type": "VALUE_TO_TEXT", "conversations": [CONV["conversations"][0]]}, "field 'conversations' has no assistant turn"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "steerlm.jsonl"
    path.write_text(json.dumps({"input": "x", "output": "y"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: {needle}"):
        SFTDataset(str(path), CharTokenizer(), 512)


def test_sft_dataset_masks_by_segment_and_adds_no_eos(tmp_path):
    path = tmp_path / "steerlm.jsonl"
    conv = {"system": "", "mask": "User", "type": "VALUE_TO_TEXT",
            "conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "ab", "label": "verbosity:0"}]}
    path.write_text(json.dumps(conv) + "\n")
    tok = CharTokenizer()
    ds = SFTDataset(str(path), tok, 512, add_eos=True)
    ids, mask = ds.sequence(0)
    text = tok.ids_to_text(ids.tolist())
    assert text.endswith("<extra_id_2>verbosity:0\nab\n<extra_id_1>")  # no EOS after the final turn start
    assert tok.ids_to_text(ids[mask.bool()].tolist()) == "ab\n<extra_id_1>"


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_tokenizers_chat_template_carries_the_label_lines(tmp_path):
    from nemo_aligner.data.chat_template import ChatTemplate
    from nemo_aligner.data.steerlm_template import render_with_chat_template

    template = ChatTemplate(CHATML)
    seg = render_with_chat_template({**CONV, "type": "VALUE_TO_TEXT"}, template)
    assert "".join(t for t, _ in seg) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<extra_id_2>quality:4,verbosity:1\nHello<|im_end|>\n"
        "<|im_start|>user\nMore<|im_end|>\n"
        "<|im_start|>assistant\n<extra_id_2>quality:3,verbosity:2\nSure thing<|im_end|>\n")
    assert learned(seg) == ["Hello<|im_end|>\n", "Sure thing<|im_end|>\n"]  # the label lines are context

    seg = render_with_chat_template({**CONV, "type": "TEXT_TO_VALUE"}, template)
    assert "<|im_start|>assistant\nHello\n<extra_id_2>quality:4,verbosity:1<|im_end|>\n" in "".join(t for t, _ in seg)
    assert learned(seg) == ["quality:4,verbosity:1<|im_end|>\n", "quality:3,verbosity:2<|im_end|>\n"]

    prompt = conditioned_prompt("Hi", "quality:4,verbosity:1", system="Be brief.", chat_template=template)
    first = {**CONV, "type": "VALUE_TO_TEXT", "conversations": CONV["conversations"][:2]}
    text = "".join(t for t, _ in render_with_chat_template(first, template))
    assert text.startswith(prompt) and text[len(prompt):] == "Hello<|im_end|>\n"

    # The SFT dataset takes the tokenizer's template unless NeMo's tokens are set.
    path = tmp_path / "steerlm.jsonl"
    path.write_text(json.dumps(first) + "\n")
    tok = CharTokenizer()
    tok.chat_template = template
    ids, mask = SFTDataset(str(path), tok, 512).sequence(0)
    assert tok.ids_to_text(ids.tolist()) == text and tok.ids_to_text(ids[mask.bool()].tolist()) == "Hello<|im_end|>\n"
    ids, _ = SFTDataset(str(path), tok, 512, chat_prompt_tokens=chat_prompt_tokens()).sequence(0)
    assert tok.ids_to_text(ids.tolist()).startswith("<extra_id_0>System\nBe brief.\n")
