import pytest

from nemo_aligner.data.templates import DEFAULT_PROMPT_TEMPLATE, render_chat_segments, render_prompt


def test_render_prompt():
    assert render_prompt(DEFAULT_PROMPT_TEMPLATE, "Add 1 and 2") == "Add 1 and 2\n\n"
    assert render_prompt('Q: {input} {"json": 1}\nA:', "x{y}") == 'Q: x{y} {"json": 1}\nA:'
    with pytest.raises(ValueError, match=r"prompt template 'Question: \{question\}' has no '\{input\}'"):
        render_prompt("Question: {question}", "x")


def test_chat_segments_exact():
    sample = {
        "system": "Be brief.",
        "conversations": [
            {"from": "User", "value": "Hi"},
            {"from": "Assistant", "value": "Hello!"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Ciao"},
        ],
    }
    assert render_chat_segments(sample) == [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", False),
        ("Hello!<|end|>", True),
        ("\n<|user|>\nBye<|end|>\n<|assistant|>\n", False),
        ("Ciao<|end|>", True),
    ]


def test_chat_openai_keys_match_sharegpt_keys():
    sharegpt = {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert render_chat_segments(sharegpt) == [("<|user|>\nHi<|end|>\n<|assistant|>\n", False), ("Yo<|end|>", True)]
    assert render_chat_segments(openai) == render_chat_segments({"system": "S", **sharegpt})


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"conversations": []}, "field 'conversations' must be a non-empty list of turns, got list"),
        ({"conversations": "hi"}, "field 'conversations' must be a non-empty list of turns, got str"),
        ({"system": 3, "conversations": [{"from": "gpt", "value": "x"}]}, "field 'system' must be a string, got int"),
        ({"conversations": [{"from": "user", "value": "x"}]}, "has no assistant turn"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from is 'robot'; use one of"),
        ({"conversations": [{"role": "assistant"}]}, "conversations[0] needs 'from' and 'value' (or 'role' and 'content')"),
        ({"conversations": [{"role": "assistant", "content": ["x"]}]}, "conversations[0].content must be a string, got list"),
        ({"conversations": ["hello"]}, "conversations[0] must be an object, got str"),
    ],
)
def test_chat_errors(sample, message):
    with pytest.raises(ValueError) as err:
        render_chat_segments(sample)
    assert message in str(err.value)
