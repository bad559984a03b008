"""SteerLM steps 3 and 4 on the bundled task where the attribute can be checked (verbosity is the
reply's length band, data/quickstart/steerlm_*.jsonl): conditioned prompts from
``steerlm.attributes`` / ``steerlm.label`` / a line's own label, and a model fine-tuned with
attribute conditioning that follows the requested verbosity, monotonically."""

import json

import pytest
from omegaconf import OmegaConf

from helpers import ROOT, SFT_SCRIPT, run

from nemo_aligner.data.errors import DataError
from nemo_aligner.generation.jsonl_generate import prompt_text, steerlm_settings

GENERATE_SCRIPT = ROOT / "examples/nlp/gpt/generate.py"


def settings(**steerlm):
    return steerlm_settings(OmegaConf.merge(OmegaConf.load(ROOT / "conf/gpt_generate.yaml"), {"steerlm": steerlm}))


def test_attributes_become_a_label_in_the_attribute_order():
    s = settings(attributes={"verbosity": 1, "helpfulness": 4})
    assert s["label"] == "helpfulness:4,verbosity:1"
    assert prompt_text({"text": "Hi"}, "f:1", s) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,verbosity:1\n")
    # A line's own label and system win over the config's.
    assert prompt_text({"text": "Hi", "label": "humor:2", "system": "S"}, "f:1", s).endswith(
        "System\nS\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>humor:2\n")
    assert settings() is None and prompt_text({"text": "Hi"}, "f:1", None) == "Hi"


def test_with_a_tokenizer_chat_template_the_prompt_is_the_templates():
    from nemo_aligner.data.chat_template import ChatTemplate

    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    s = dict(settings(label="verbosity:1"), chat_template=ChatTemplate(chatml))
    assert prompt_text({"text": "Hi"}, "f:1", s) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<extra_id_2>verbosity:1\n")


@pytest.mark.parametrize("steerlm,needle", [
    ({"attributes": {"wit": 3}}, "steerlm.attributes.wit: unknown attribute"),
    ({"attributes": {"verbosity": "high"}}, r"steerlm.attributes.verbosity='high'; it must be a whole number"),
    ({"attributes": {"verbosity": 1}, "label": "verbosity:1"}, "not both"),
    ({"label": "verbosity=1"}, "steerlm.label: malformed attribute label entry 'verbosity=1'"),
])
def test_bad_steerlm_settings(steerlm, needle):
    with pytest.raises(ValueError, match=needle):
        settings(**steerlm)


def test_a_bad_label_on_a_line_names_it():
    with pytest.raises(DataError, match="in.jsonl:3: field 'label': unknown attribute 'wit'"):
        prompt_text({"text": "Hi", "label": "wit:1"}, "in.jsonl:3", settings(label="verbosity:1"))


@pytest.mark.slow
def test_attribute_conditioned_sft_follows_the_requested_verbosity(tmp_path):
    """Tiny model from scratch, 3 epochs on the 1500 bundled conversations; greedy replies to the
    16 held-out prompts at each verbosity. Measured mean reply lengths (words) for verbosity
    0..4: 1.0, 2.7, 4.1, 6.7, 8.2 (the data's bands: 1-2, 3-4, 5-6, 7-8, 9-10)."""
    run(SFT_SCRIPT, [
        "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.encoder_seq_length=128",
        "model.data.data_prefix.train=data/quickstart/steerlm_train.jsonl", "model.data.data_prefix.validation=null",
        "trainer.sft.max_epochs=3", "model.micro_batch_size=16", "model.global_batch_size=32",
        "trainer.sft.val_check_interval=0", "trainer.sft.save_interval=0", f"exp_manager.explicit_log_dir={tmp_path}",
    ])
    prompts = [json.loads(line) for line in (ROOT / "data/quickstart/steerlm_prompts.jsonl").read_text().splitlines()]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(dict(p, label=f"verbosity:{v}", v=v)) + "\n" for v in range(5) for p in prompts))
    out = tmp_path / "replies.jsonl"
    run(GENERATE_SCRIPT, [f"pretrained_checkpoint.restore_from_path={tmp_path / 'final_model'}", f"input_file={requests}",
                          f"output_file={out}", "sampling.greedy=true", "sampling.max_new_tokens=40",
                          "steerlm.label=verbosity:2"])  # each line's own label wins
    lengths = {v: [] for v in range(5)}
    for line in out.read_text().splitlines():
        row = json.loads(line)
        assert row["response"].endswith("<extra_id_1>")  # the reply stops at the next turn's start
        lengths[row["v"]].append(len(row["response"].removesuffix("<extra_id_1>").split()))
    means = [sum(lengths[v]) / len(lengths[v]) for v in range(5)]
    assert all(a < b for a, b in zip(means, means[1:])), means  # monotonic in the requested value
    assert means[4] - means[0] >= 5, means  # and by a wide margin (measured: 7.2 words)
