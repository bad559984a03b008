"""GRPO and REINFORCE end to end on the bundled counting task (real entry points).

The policy is the tiny SFT model of the ``tiny_policy`` fixture (2 epochs: it counts the
words of about half of the held-out prompts right). A short run must raise the held-out
greedy reward clearly; a resumed run must equal an uninterrupted one after a real SIGKILL.
"""

import pytest

from helpers import GRPO_SCRIPT, REINFORCE_SCRIPT, read_metrics, rl_args, run

SCRIPTS = {"grpo": GRPO_SCRIPT, "reinforce": REINFORCE_SCRIPT}


def rewards(metrics, key):
    return [m[key] for m in metrics if key in m]


@pytest.mark.slow
@pytest.mark.parametrize("algo,steps", [("grpo", 100), ("reinforce", 100)])
def test_short_run_raises_held_out_reward(tiny_policy, tmp_path, algo, steps):
    run(SCRIPTS[algo], rl_args(algo, tiny_policy, tmp_path, f"trainer.{algo}.max_steps={steps}",
                               f"trainer.{algo}.val_check_interval={steps // 2}"))
    metrics = read_metrics(tmp_path)
    val = rewards(metrics, "val_rollouts/rewards")
    train = rewards(metrics, "train_rollouts/rewards")
    assert metrics[0]["step"] == 0 and len(val) == 3  # before training, half way, at the end
    assert val[-1] >= val[0] + 0.15, val
    assert sum(train[-20:]) / 20 > sum(train[:20]) / 20 + 0.05, train
    last = metrics[-1]
    assert last["train_optim/optim_step"] == steps  # 64 samples per rollout / global batch 64
    assert last["train_rollouts/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4)
    for name in ("generate", "init_logprobs", "reward", "train"):
        assert last[f"timers/{name}"] > 0
    # One optimizer step per rollout: the training forward gives the old log-probs (no extra
    # pass) unless REINFORCE's KL penalty needs them for the reward first.
    assert ("timers/logprobs" in last) == (algo == "reinforce")
    rows = (tmp_path / "rollouts.jsonl").read_text().splitlines()
    assert len(rows) == 4 * (steps + 3)  # four rows per training step and per validation


@pytest.mark.slow
def test_grpo_resume_after_sigkill_equals_uninterrupted(tiny_policy, tmp_path, dist_world_of_one):
    """4 steps straight == 2 steps, SIGKILL in step 3 (from inside the reward call), rerun."""
    common = ["trainer.grpo.max_steps=4", "trainer.grpo.val_check_interval=0", "trainer.grpo.save_interval=2",
              "exp_manager.checkpoint_callback_params.save_final_model=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(GRPO_SCRIPT, rl_args("grpo", tiny_policy, straight, *common))
    killed = run(GRPO_SCRIPT, rl_args("grpo", tiny_policy, resumed, *common,
                                      "reward.function=tests.rl_rewards:exact_match_then_die"),
                 check=False, env={"KILL_AT_CALL": "3"})
    assert killed.returncode == -9
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2]
    run(GRPO_SCRIPT, rl_args("grpo", tiny_policy, resumed, *common))

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("train_rollouts/rewards", "train_optim/loss", "train_optim/grad_norm", "consumed_samples"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), key

    from megatron.core.dist_checkpointing import load_plain_tensors

    wa, wb = load_plain_tensors(str(straight / "final_model")), load_plain_tensors(str(resumed / "final_model"))
    assert wa.keys() == wb.keys()
    for key in wa:
        if hasattr(wa[key], "shape"):
            assert (wa[key] == wb[key]).all(), key
