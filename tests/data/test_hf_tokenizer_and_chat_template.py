"""Tokenizers and chat templates from a Hugging Face directory agree with ``transformers``."""

import json

import pytest

from helpers import ROOT

QUICKSTART_TOKENIZER = ROOT / "data" / "quickstart" / "tokenizer.json"

# ChatML (Qwen-style): a default system prompt, loop variables, an optional generation prompt.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3 style: BOS string, whitespace control, trim, generation blocks, raise_exception, tojson.
LLAMA3 = """{{- bos_token }}
{%- if tools is not none %}{{- '<tools>' + (tools | tojson) + '</tools>' }}{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?  "},
    {"role": "assistant", "content": " 6, «of course» ✓"},
]
TEXTS = ["hello world", "  leading spaces and\ttabs\nnewlines", "unicode: naïve café ✓ 日本", "", "</s> as text"]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def hf_tokenizer_dir(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(QUICKSTART_TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHATML if request.param == "chatml" else LLAMA3
    d = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(d)
    return d, tok


def test_tokenizer_round_trip_matches_transformers(hf_tokenizer_dir):
    from nemo_aligner.data.tokenizers import load_tokenizer

    d, ref = hf_tokenizer_dir
    ours = load_tokenizer(str(d))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.text_to_ids(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        with_specials = [ours.bos_id] + ids + [ours.eos_id, ours.pad_id]
        assert ours.ids_to_text(with_specials) == ref.decode(with_specials, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_transformers(hf_tokenizer_dir, add_generation_prompt):
    from nemo_aligner.data.tokenizers import load_tokenizer

    d, ref = hf_tokenizer_dir
    template = load_tokenizer(str(d)).chat_template
    assert template is not None
    for messages in (MESSAGES, MESSAGES[1:], MESSAGES[1:2]):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected
    tools = [{"name": "calc", "description": "adds <a> & «b»", "parameters": {"type": "object"}}]
    expected = ref.apply_chat_template(MESSAGES[1:2], tools=tools, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    assert template.render(MESSAGES[1:2], add_generation_prompt=add_generation_prompt, tools=tools) == expected


def test_template_errors_surface():
    from jinja2.exceptions import TemplateError

    from nemo_aligner.data.chat_template import ChatTemplate

    with pytest.raises(TemplateError, match="unknown role tool"):
        ChatTemplate(LLAMA3, {"bos_token": "<s>"}).render([{"role": "tool", "content": "x"}])


def test_chat_segments_mark_exactly_the_assistant_turns(hf_tokenizer_dir):
    from nemo_aligner.data.tokenizers import load_tokenizer

    d, ref = hf_tokenizer_dir
    template = load_tokenizer(str(d)).chat_template
    segments = template.segments(MESSAGES)
    assert "".join(text for text, _ in segments) == ref.apply_chat_template(MESSAGES, tokenize=False)
    responses = [text for text, is_loss in segments if is_loss]
    assert len(responses) == 2
    for text, message in zip(responses, [MESSAGES[2], MESSAGES[4]]):
        assert message["content"].strip() in text
        assert "user" not in text


def test_sft_chat_data_uses_the_tokenizers_template(hf_tokenizer_dir, tmp_path):
    """Chat SFT samples render through the HF template; the loss covers assistant text only."""
    from nemo_aligner.data.datasets import SFTDataset
    from nemo_aligner.data.tokenizers import load_tokenizer

    d, ref = hf_tokenizer_dir
    tokenizer = load_tokenizer(str(d))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"system": "Be brief.", "conversations": [
        {"from": "User", "value": "What is 2 + 2?"}, {"from": "Assistant", "value": "It is 4."}]}) + "\n")
    ds = SFTDataset(str(path), tokenizer, max_seq_length=256)
    sample = ds[0]
    full = ref.apply_chat_template(MESSAGES[:3], tokenize=False)
    ids = ref.encode(full, add_special_tokens=False)
    assert sample["labels"].tolist() == ids[1:]  # no EOS appended: the template closes turns
    trained = [t for t, m in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()) if m]
    assert "It is 4." in ref.decode(trained)
    assert "2 + 2" not in ref.decode(trained)
