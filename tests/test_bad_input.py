"""User errors: one line naming what is wrong, non-zero exit, nothing written."""

import json

import pytest

from helpers import SFT_SCRIPT, TINY_SFT, run

pytestmark = pytest.mark.slow  # each case starts the entry point (a few seconds)


def sft(tmp_path, *overrides, nproc=1):
    log_dir = tmp_path / "logs"
    proc = run(SFT_SCRIPT, [*TINY_SFT, f"exp_manager.explicit_log_dir={log_dir}", "trainer.sft.max_steps=1", *overrides],
               nproc=nproc, check=False)
    return proc, log_dir


def error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.mark.parametrize("lines,needle", [
    ([{"input": "a", "output": "b"}, '{"input": "x", "output": '], ":2: invalid JSON"),
    ([{"input": "a", "output": "b"}, {"input": "a"}], ":2: missing field 'output'"),
    ([{"input": "a", "output": 3}], ":1:"),
    ([], ":1: file has no samples"),
], ids=["malformed", "missing-field", "wrong-type", "empty"])
def test_bad_data_file(tmp_path, lines, needle):
    data = write(tmp_path / "train.jsonl", lines)
    proc, log_dir = sft(tmp_path, f"model.data.data_prefix.train={data}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert str(data) in line and needle in line
    assert not log_dir.exists()


def test_sequence_longer_than_model(tmp_path):
    data = write(tmp_path / "train.jsonl", [{"input": "word " * 200, "output": "x"}])
    proc, log_dir = sft(tmp_path, f"model.data.data_prefix.train={data}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"{data}:1" in line and "model.data.truncation" in line
    assert not log_dir.exists()


def test_missing_data_file(tmp_path):
    proc, log_dir = sft(tmp_path, f"model.data.data_prefix.train={tmp_path}/nope.jsonl")
    assert proc.returncode == 1 and "nope.jsonl" in error_line(proc)
    assert not log_dir.exists()


def test_unknown_config_key(tmp_path):
    proc, log_dir = sft(tmp_path, "model.not_a_key=3")
    assert proc.returncode != 0
    assert "not_a_key" in proc.stderr and not log_dir.exists()


def test_tensor_parallel_size_not_dividing_world(tmp_path):
    proc, log_dir = sft(tmp_path, "model.tensor_model_parallel_size=2")
    assert proc.returncode == 1
    assert "not divisible by tensor_model_parallel_size (2)" in error_line(proc)
    assert not log_dir.exists()


def test_layers_not_divisible_by_pipeline(tmp_path):
    proc, log_dir = sft(tmp_path, "model.num_layers=3", "model.pipeline_model_parallel_size=2", nproc=2)
    assert proc.returncode != 0
    assert "model.num_layers=3 is not divisible by pipeline_model_parallel_size=2" in proc.stderr
    assert not log_dir.exists()


def test_missing_checkpoint(tmp_path):
    proc, log_dir = sft(tmp_path, f"pretrained_checkpoint.restore_from_path={tmp_path}/missing")
    assert proc.returncode == 1 and "restore_from_path" in error_line(proc)
    assert not log_dir.exists()
