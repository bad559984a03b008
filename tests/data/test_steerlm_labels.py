"""SteerLM labels and annotation (NeMo-Aligner's formats): clip and round on fixed predictions,
label parsing errors, the texts scored for a hand-written conversation, and resume."""

import json
import sys

import pytest

from nemo_aligner.data.errors import DataError
from nemo_aligner.data.steerlm import (
    ATTRIBUTES,
    annotate_file,
    annotation_prompts,
    format_label,
    parse_label,
    prediction_to_values,
)

CONVERSATION = {
    "system": "ignored by the annotation (NeMo-Aligner scores with its fixed system prompt)",
    "mask": "User",
    "type": "VALUE_TO_TEXT",
    "conversations": [
        {"from": "User", "value": "Hi", "label": None},
        {"from": "Assistant", "value": "Hello!", "label": "quality:1"},
        {"from": "User", "value": "Bye"},
        {"from": "Assistant", "value": "Goodbye.", "label": "old"},
    ],
}


def test_nine_attributes_in_nemo_aligners_order():
    assert ATTRIBUTES == ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
                          "complexity", "verbosity")


def test_clip_and_round_on_fixed_predictions():
    values = prediction_to_values([-0.3, 4.7, 2.5, 1.49, 3.5, 0.5, 1.51, 9.0, 2.0])
    assert values == [0, 4, 2, 1, 4, 0, 2, 4, 2]  # clipped to [0, 4]; halves round to even
    assert format_label(values) == ("quality:0,toxicity:4,humor:2,creativity:1,helpfulness:4,correctness:0,"
                                    "coherence:2,complexity:4,verbosity:2")
    assert parse_label(format_label(values)) == dict(zip(ATTRIBUTES, values))


@pytest.mark.parametrize("text,needle", [
    ("quality:4,verbosity", "malformed attribute label entry 'verbosity'"),
    ("quality:high", "malformed attribute label entry 'quality:high'"),
    ("quality:4,friendliness:2", "unknown attribute 'friendliness'"),
    ("", "empty attribute label"),
])
def test_bad_labels_name_where(text, needle):
    with pytest.raises(DataError, match=needle) as e:
        parse_label(text, where="f.jsonl:3: conversations[1].label")
    assert str(e.value).startswith("f.jsonl:3: conversations[1].label")


def test_texts_scored_for_a_hand_written_conversation():
    system = ("<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.\n")
    first = system + "<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n<extra_id_2>"
    second = first[: -len("<extra_id_2>")] + "<extra_id_1>User\nBye\n<extra_id_1>Assistant\nGoodbye.\n<extra_id_2>"
    assert annotation_prompts(CONVERSATION) == [first, second]
    with pytest.raises(DataError, match="field 'mask'"):
        annotation_prompts({"conversations": CONVERSATION["conversations"]}, where="x.jsonl:2")


def test_annotation_labels_each_turn_and_resumes(tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [dict(CONVERSATION, conversations=[dict(t, value=f"{t['value']} {i}") for t in CONVERSATION["conversations"]])
            for i in range(3)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []

    def score(texts):
        calls.append(len(texts))
        return [[0.4 + k, 3.6, -2, 2.5, 1.5, 0, 4, 5, 1] for k in range(len(texts))]

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(rows[0]) + "\n" + '{"conversations": [{"from": "U')  # one done, then a torn line
    assert annotate_file(source, out, score, progress=False, texts_per_call=2) == 2
    assert calls == [2, 2]  # conversation 0 was skipped; two labelled turns each, a call per 2 texts
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3
    turns = written[1]["conversations"]
    assert turns[0]["label"] is None and "label" not in turns[2]
    assert turns[1]["label"] == ("quality:0,toxicity:4,humor:0,creativity:2,helpfulness:2,correctness:0,"
                                 "coherence:4,complexity:4,verbosity:1")
    assert turns[3]["label"].startswith("quality:1,")
    assert annotate_file(source, out, score, progress=False) == 0  # everything done: nothing rescored
    assert calls == [2, 2]
    out.unlink()
    assert annotate_file(source, out, score, progress=False) == 3 and calls[2:] == [6]  # one call for all


@pytest.mark.slow
def test_annotation_script_with_a_regression_reward_model(tmp_path):
    from helpers import ROOT, RM_SCRIPT, run

    script = ROOT / "examples/nlp/data/steerlm/attribute_annotate.py"
    run(RM_SCRIPT, ["model.reward_model_type=regression", "model.num_attributes=2", "model.num_layers=2",
                    "model.hidden_size=64", "model.ffn_hidden_size=128", "model.encoder_seq_length=256",
                    f"model.data.data_prefix.train={ROOT / 'data/quickstart/rm_regression_train.jsonl'}",
                    "model.data.data_prefix.validation=null", "trainer.rm.max_steps=2", "trainer.rm.save_interval=0",
                    f"exp_manager.explicit_log_dir={tmp_path / 'rm'}"])
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(CONVERSATION) + "\n")
    common = ["--rm-model-file", str(tmp_path / "rm" / "final_model"), "--input-file", str(source)]
    proc = run(script, [*common, "--output-file", str(tmp_path / "nine.jsonl")], check=False)
    assert proc.returncode == 1 and "has 2 outputs but 9 attributes" in proc.stderr
    run(script, [*common, "--output-file", str(tmp_path / "out.jsonl"), "--attributes", "correctness,verbosity"])
    turns = json.loads((tmp_path / "out.jsonl").read_text())["conversations"]
    for turn in (turns[1], turns[3]):
        values = parse_label(turn["label"], ("correctness", "verbosity"))
        assert list(values) == ["correctness", "verbosity"] and all(0 <= v <= 4 for v in values.values())
    assert turns[0]["label"] is None

    # Through the reward-model server (every attribute per text): the same labels.
    from helpers import SERVE_RM_SCRIPT, background, free_port, wait_for_port

    port = free_port()
    rm = tmp_path / "rm" / "final_model"
    serve = [sys.executable, str(SERVE_RM_SCRIPT), f"rm_model_file={rm}", f"inference.port={port}",
             "inference.exit_timeout_s=1"]
    remote = ["--port", str(port), "--tokenizer", str(rm / "tokenizer"), "--input-file", str(source)]
    with background(serve, tmp_path / "server.log") as server:
        wait_for_port(port, server)
        proc = run(script, [*remote, "--output-file", str(tmp_path / "nine_remote.jsonl")], check=False)
        assert proc.returncode == 1 and "gives 2 outputs per text but 9 attributes are named" in proc.stderr
        run(script, [*remote, "--output-file", str(tmp_path / "remote.jsonl"), "--attributes", "correctness,verbosity"])
    assert (tmp_path / "remote.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
