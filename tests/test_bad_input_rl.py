"""Online-RL user errors: one line naming the key or file, exit 1, nothing written."""

import json

import pytest

from helpers import GRPO_SCRIPT, REINFORCE_SCRIPT, rl_args, run

pytestmark = pytest.mark.slow  # each case starts the entry point (a few seconds)


def rl(script, algo, policy, tmp_path, *overrides, nproc=1):
    log_dir = tmp_path / "logs"
    proc = run(script, rl_args(algo, policy, log_dir, f"trainer.{algo}.max_steps=2", *overrides), nproc=nproc, check=False)
    return proc, log_dir


def error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert lines and len(set(l.split("error:", 1)[1] for l in lines)) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("spec,needle", [
    ("no_such_module.rewards:fn", "cannot import 'no_such_module.rewards'"),
    ("nemo_aligner.rewards.quickstart:nope", "has no 'nope'"),
    ("nemo_aligner.rewards.quickstart", "name it as 'package.module:callable'"),
    ("tests.rl_rewards:wrong_count", "returned 63 rewards for 64 responses"),  # asked per generated micro-batch
    ("tests.rl_rewards:not_a_number", "returned 'abc' for response 0"),
], ids=["no-module", "no-function", "no-colon", "wrong-count", "not-a-number"])
def test_bad_reward_function(tiny_policy, tmp_path, spec, needle):
    proc, log_dir = rl(GRPO_SCRIPT, "grpo", tiny_policy, tmp_path, f"reward.function={spec}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "reward.function" in line and needle in line, line
    assert not log_dir.exists()  # validation before the first step found it: nothing written


@pytest.mark.parametrize("overrides,needle", [
    (["model.reinforce.num_rollout_samples=48"], "model.reinforce.num_rollout_samples=48 is not divisible by model.global_batch_size=64"),
    (["model.reinforce.num_rollout_samples=60"], "not divisible by trainer.reinforce.num_rollouts_per_prompt=8"),
    (["model.reinforce.length_params.max_length=64"], "model.reinforce.length_params.max_length=64 leaves no room"),
    (["model.reinforce.sampling_params.temperature=0"], "model.reinforce: sampling_params.temperature=0"),
], ids=["samples-vs-batch", "samples-vs-per-prompt", "no-room", "temperature"])
def test_bad_rollout_config(tiny_policy, tmp_path, overrides, needle):
    proc, log_dir = rl(REINFORCE_SCRIPT, "reinforce", tiny_policy, tmp_path, *overrides)
    assert proc.returncode == 1
    assert needle in error_line(proc)
    assert not log_dir.exists()


def test_prompts_not_divisible_by_data_parallel(tiny_policy, tmp_path):
    # 24 samples / 8 per prompt = 3 prompts per step, which two data-parallel ranks cannot split.
    proc, log_dir = rl(REINFORCE_SCRIPT, "reinforce", tiny_policy, tmp_path, "model.reinforce.num_rollout_samples=24",
                       "model.global_batch_size=8", "model.micro_batch_size=4", nproc=2)
    assert proc.returncode == 1
    assert "not divisible by the data-parallel size 2" in error_line(proc)
    assert not log_dir.exists()


@pytest.mark.parametrize("row,needle", [
    ({"text": "Count the words: " + "cat " * 60}, ":2: prompt has"),
    ({"prompt": "Count the words: cat"}, ":2: missing field 'text'"),
], ids=["too-long", "no-text"])
def test_bad_prompt_file(tiny_policy, tmp_path, row, needle):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"text": "Count the words: cat\n\n", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    proc, log_dir = rl(GRPO_SCRIPT, "grpo", tiny_policy, tmp_path, f"model.data.data_prefix.train={data}",
                       "model.grpo.num_prompts_per_step=1", "model.global_batch_size=8", "model.micro_batch_size=8")
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"{data}:2" in line and needle in line, line
    if needle.endswith("prompt has"):
        assert "model.encoder_seq_length=64 minus model.grpo.length_params.max_length=16" in line
    assert not log_dir.exists()
