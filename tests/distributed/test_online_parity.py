"""The first GRPO steps give the same loss, grad norm and rewards at TP2, PP2 and DP2 as
on one process (fp32).

Samples are drawn with seeds from (seed, step, global sample index), the rollout is gathered
over data-parallel ranks before the optimizer steps, and the loss is a token mean over the
whole global batch, so every layout must agree to float rounding. PP2 generates with a
full-depth engine refit from both stages (the stages split the samples).
"""

import pytest

from helpers import GRPO_SCRIPT, read_metrics, rl_args, run

LAYOUTS = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "dp2": (2, 1, 1)}  # nproc, TP, PP
COMMON = ["trainer.grpo.max_steps=2", "trainer.grpo.val_check_interval=0",
          "model.grpo.num_prompts_per_step=4", "model.global_batch_size=16", "model.micro_batch_size=4"]


def grpo_metrics(policy, log_dir, nproc, tp, pp):
    run(GRPO_SCRIPT, rl_args("grpo", policy, log_dir, *COMMON, f"model.tensor_model_parallel_size={tp}",
                             f"model.pipeline_model_parallel_size={pp}"), nproc=nproc)
    return read_metrics(log_dir)


@pytest.fixture(scope="module")
def reference(tiny_policy, tmp_path_factory):
    return grpo_metrics(tiny_policy, tmp_path_factory.mktemp("ref"), 1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grpo_steps_match_single_process(layout, reference, tiny_policy, tmp_path):
    nproc, tp, pp = LAYOUTS[layout]
    got = grpo_metrics(tiny_policy, tmp_path, nproc, tp, pp)
    assert [m["step"] for m in got] == [1, 2]
    assert reference[0]["train_optim/optim_step"] == 2  # two optimizer steps per rollout
    for x, y in zip(reference, got):
        assert y["train_rollouts/rewards"] == x["train_rollouts/rewards"]  # the same samples
        assert y["train_rollouts/generation_length"] == x["train_rollouts/generation_length"]
        assert y["train_optim/loss"] == pytest.approx(x["train_optim/loss"], abs=1e-5)
        assert y["train_optim/grad_norm"] == pytest.approx(x["train_optim/grad_norm"], rel=1e-4, abs=1e-5)
        assert y["train_rollouts/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4)
