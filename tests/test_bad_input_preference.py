"""User errors in preference data and configs: one line naming file:line and field and the
fix, exit status 1, nothing written (DPO, KTO, reward model, scoring)."""

import json

import pytest

from helpers import ROOT, run

pytestmark = pytest.mark.slow
SCRIPTS = {
    "dpo": ROOT / "examples/nlp/gpt/train_gpt_dpo.py",
    "kto": ROOT / "examples/nlp/gpt/train_gpt_kto.py",
    "rm": ROOT / "examples/nlp/gpt/train_reward_model.py",
}
GOOD = {"prompt": "Q\n\n", "chosen_response": "yes", "rejected_response": "no"}


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def start(algo, tmp_path, data, *extra):
    log_dir = tmp_path / "logs"
    proc = run(SCRIPTS[algo], [f"exp_manager.explicit_log_dir={log_dir}", f"trainer.{algo}.max_steps=1",
                               f"model.data.data_prefix.train={data}", "model.data.data_prefix.validation=null",
                               "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", *extra],
               check=False)
    return proc, log_dir


def error_line(proc):
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("algo,lines,extra,needle", [
    ("dpo", [GOOD, '{"prompt": "a", '], [], ":2: invalid JSON"),
    ("dpo", [GOOD, {"prompt": "a", "chosen_response": "b"}], [], ":2: missing field 'rejected_response'"),
    ("dpo", [GOOD, GOOD], ["model.dpo.preference_loss=rpo_sq"], ":1: missing field 'chosen_reward'"),
    ("dpo", [GOOD, dict(GOOD, chosen_response="word " * 80)], [], ":2: 'chosen_response' gives"),
    ("dpo", [], [], ":1: file has no samples"),
    ("kto", [{"prompt": "a", "response": "b", "preference": "yes"}], [], ":1: field 'preference'"),
    ("rm", [{"text": "a", "label": [1, 2, 3]}], ["model.reward_model_type=regression", "model.num_attributes=2"],
     ":1: field 'label' has 3 values but model.num_attributes is 2"),
    ("rm", [GOOD], ["model.rm.loss_type=margin_bt"], ":1: missing field 'margin'"),
], ids=["json", "missing-field", "rpo-needs-rewards", "too-long", "empty", "kto-flag", "label-length", "margin"])
def test_bad_data_file(tmp_path, algo, lines, extra, needle):
    data = write(tmp_path / "train.jsonl", lines)
    proc, log_dir = start(algo, tmp_path, data, *extra)
    assert proc.returncode == 1
    line = error_line(proc)
    assert str(data) in line and needle in line
    assert not log_dir.exists()


def test_too_long_line_names_the_fix(tmp_path):
    data = write(tmp_path / "train.jsonl", [dict(GOOD, rejected_response="word " * 80)])
    proc, log_dir = start("dpo", tmp_path, data)
    assert "model.data.truncation=truncate" in error_line(proc) and not log_dir.exists()


@pytest.mark.parametrize("algo,extra,needle", [
    ("dpo", ["model.dpo.preference_loss=nope"], "model.dpo.preference_loss='nope'"),
    ("dpo", ["model.dpo.ref_logprobs=cache"], "model.dpo.ref_logprobs='cache'"),
    ("dpo", ["model.data.packing.enabled=true", "model.data.packing.pack_size=100"], "less than twice max_seq_length"),
    ("rm", ["model.num_attributes=3"], "num_attributes=3 with binary_ranking"),
    ("dpo", ["model.data.micro_batch_tokens=-3"], "model.data.micro_batch_tokens=-3; give a number of tokens"),
    ("rm", ["model.data.micro_batch_tokens=lots"], "model.data.micro_batch_tokens='lots'"),
])
def test_bad_config(tmp_path, algo, extra, needle):
    data = write(tmp_path / "train.jsonl", [GOOD] * 40)
    proc, log_dir = start(algo, tmp_path, data, *extra)
    assert proc.returncode == 1 and needle in error_line(proc)
    assert not log_dir.exists()


def test_scoring_bad_input_writes_nothing(tmp_path, dist_world_of_one):
    from nemo_aligner.checkpoint.distributed import save_checkpoint
    from nemo_aligner.models.reward_model import build_reward_model

    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
               encoder_seq_length=32, vocab_size=512, reward_model_type="binary_ranking")
    save_checkpoint(tmp_path / "rm", [build_reward_model(cfg, 512, seed=1)], cfg,
                    tokenizer_dir=ROOT / "data/quickstart/tokenizer.json")
    score = ROOT / "examples/nlp/gpt/score_reward_model.py"
    data = write(tmp_path / "in.jsonl", [{"text": "ok"}, {"prompt": "Q"}])
    out = tmp_path / "out.jsonl"
    proc = run(score, [f"pretrained_checkpoint.restore_from_path={tmp_path / 'rm'}", f"input_file={data}",
                       f"output_file={out}"], check=False)
    assert proc.returncode == 1 and not out.exists()
    assert f"{data}:2: missing field 'response'" in error_line(proc)

    proc = run(score, [f"pretrained_checkpoint.restore_from_path={tmp_path}", f"input_file={data}",
                       f"output_file={out}"], check=False)
    assert proc.returncode == 1 and "is not a reward model" in error_line(proc) and not out.exists()

    proc = run(score, [f"pretrained_checkpoint.restore_from_path={tmp_path / 'rm'}", f"input_file={tmp_path}/nope.jsonl",
                       f"output_file={out}"], check=False)
    assert proc.returncode == 1 and not out.exists()
    line = error_line(proc)
    assert "input_file=" in line and "nope.jsonl not found" in line
