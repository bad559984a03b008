"""process_to_regression_format.py (NeMo-Aligner's SteerLM step 1): the texts and value lists of
a hand-written conversation, -100 for missing attributes, file:line errors, the command end to
end, and our regression reward-model reader on its output."""

import importlib.util
import json
import sys

import pytest

from helpers import ROOT, own_process
from nemo_aligner.data.errors import DataError
from nemo_aligner.data.preference import RegressionRewardDataset
from nemo_aligner.data.tokenizers import load_tokenizer

SCRIPT = ROOT / "examples/nlp/data/steerlm/process_to_regression_format.py"
_spec = importlib.util.spec_from_file_location("process_to_regression_format", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

SYSTEM = ("<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.\n")
FULL = "quality:4,toxicity:0,humor:1,creativity:2,helpfulness:4,correctness:3,coherence:4,complexity:1,verbosity:2"
# Out of order on purpose: the values follow the attribute order, not the label's.
SECOND = "verbosity:0,complexity:2,coherence:3,correctness:1,helpfulness:0,creativity:4,humor:3,toxicity:1,quality:2"
CONVERSATION = {
    "system": "ignored: NeMo-Aligner renders its fixed system prompt",
    "mask": "User",
    "type": "VALUE_TO_TEXT",
    "conversations": [
        {"from": "User", "value": "What is 2+2?", "label": None},
        {"from": "Assistant", "value": "4.", "label": FULL},
        {"from": "User", "value": "And 3+3?"},
        {"from": "Assistant", "value": "Six, I think.", "label": ""},  # empty: skipped, as in NeMo-Aligner
        {"from": "User", "value": "Sure? café"},
        {"from": "Assistant", "value": "Yes: 6.", "label": SECOND},
    ],
}
FIRST_TEXT = SYSTEM + "<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_2>"
SECOND_TEXT = (SYSTEM + "<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4.\n"
               "<extra_id_1>User\nAnd 3+3?\n<extra_id_1>Assistant\nSix, I think.\n"
               "<extra_id_1>User\nSure? café\n<extra_id_1>Assistant\nYes: 6.\n<extra_id_2>")
EXPECTED = [
    {"text": FIRST_TEXT, "label": [4.0, 0.0, 1.0, 2.0, 4.0, 3.0, 4.0, 1.0, 2.0]},
    {"text": SECOND_TEXT, "label": [2.0, 1.0, 3.0, 4.0, 0.0, 1.0, 3.0, 2.0, 0.0]},
]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def with_label(label):
    return {"mask": "User", "conversations": [{"from": "User", "value": "Hi"},
                                              {"from": "Assistant", "value": "Hello", "label": label}]}


def test_texts_and_values_of_a_hand_written_conversation():
    assert script.regression_lines(CONVERSATION) == EXPECTED


def test_missing_attributes_are_minus_100_in_their_positions():
    [line] = script.regression_lines(with_label("toxicity:1,helpfulness:3,verbosity:0"))
    assert line["label"] == [-100.0, 1.0, -100.0, -100.0, 3.0, -100.0, -100.0, -100.0, 0.0]
    # HelpSteer2-Preference's strengths are negative integers in the quality slot.
    [line] = script.regression_lines(with_label("quality:-3"))
    assert line["label"] == [-3.0] + [-100.0] * 8


@pytest.mark.parametrize("label,needle", [
    ("quality:4,helpfulness", "conversations[1].label: malformed attribute label entry 'helpfulness'"),
    ("quality:4,friendliness:2", "conversations[1].label: unknown attribute 'friendliness'"),
    (4, "conversations[1].label: expected a string"),
])
def test_bad_labels_name_file_line_and_field(tmp_path, label, needle):
    path = write_lines(tmp_path / "in.jsonl", [CONVERSATION, "", with_label(label)])
    with pytest.raises(DataError) as e:
        script.convert_file(path, tmp_path / "out.jsonl")
    assert str(e.value).startswith(f"{path}:3: ") and needle in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_other_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    cases = [
        (write_lines(tmp_path / "a.jsonl", [CONVERSATION, "{not json"]), ":2: invalid JSON"),
        (tmp_path / "missing.jsonl", "--input-file"),
        (write_lines(tmp_path / "b.jsonl", [with_label(None)]), "no turn has a label"),
        (write_lines(tmp_path / "c.jsonl", [{"conversations": []}]), ":1: field 'conversations'"),
    ]
    for path, needle in cases:
        with pytest.raises(SystemExit) as e:
            script.main(["--input-file", str(path), "--output-file", str(tmp_path / "out.jsonl")])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_command_end_to_end_and_our_regression_reader_trains_on_it(tmp_path):
    source = write_lines(tmp_path / "conversations.jsonl", [CONVERSATION, with_label("humor:2")])
    out = tmp_path / "reg.jsonl"
    proc = own_process([sys.executable, str(SCRIPT), "--input-file", str(source), "--output-file", str(out)],
                       timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 labelled turns from 2 conversations" in proc.stdout
    raw = out.read_text(encoding="utf-8").splitlines()
    assert "café" in raw[1]  # written as UTF-8, not \u escapes (NeMo-Aligner's ensure_ascii=False)
    assert [json.loads(line) for line in raw] == EXPECTED + [
        {"text": SYSTEM + "<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n<extra_id_2>",
         "label": [-100.0, -100.0, 2.0] + [-100.0] * 6}]

    tokenizer = load_tokenizer(ROOT / "data/quickstart/tokenizer.json")
    ds = RegressionRewardDataset(out, tokenizer, 1024, num_attributes=9)
    assert len(ds) == 3 and ds.num_dropped == 0 and ds.num_truncated == 0
    assert ds[1]["attribute_labels"].tolist() == [EXPECTED[1]["label"]]
    assert ds[2]["attribute_labels"].tolist() == [[-100.0, -100.0, 2.0] + [-100.0] * 6]
    assert ds.lengths[1] == len(tokenizer.text_to_ids(SECOND_TEXT)) + 1  # the whole text, then EOS
