"""Resuming reproduces the uninterrupted run: 6 steps == 3 steps, new process, 3 more steps.

Dropout is on, so the restored RNG state matters; the LR schedule length is pinned
(``sched.max_steps``) so both runs follow the same schedule.
"""

import pytest
import torch

from helpers import read_metrics

COMMON = [
    "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.optim.sched.max_steps=6",
    "exp_manager.checkpoint_callback_params.save_final_model=true",
]


def final_weights(log_dir):
    from megatron.core.dist_checkpointing import load_plain_tensors

    return load_plain_tensors(str(log_dir / "final_model"))


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tp,pp", [(1, 1, 1), (2, 1, 2)], ids=["single", "pp2"])
def test_resume_equals_uninterrupted(sft_run, tmp_path, nproc, tp, pp, dist_world_of_one):
    layout = [f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sft_run(straight, *COMMON, *layout, "trainer.sft.max_steps=6", nproc=nproc)
    sft_run(resumed, *COMMON, *layout, "trainer.sft.max_steps=3", nproc=nproc)
    sft_run(resumed, *COMMON, *layout, "trainer.sft.max_steps=6", nproc=nproc)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["train/loss"] == pytest.approx(x["train/loss"], abs=1e-6)
        assert y["train/lr"] == pytest.approx(x["train/lr"], rel=1e-9)
        assert y["consumed_samples"] == x["consumed_samples"]

    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_same_run(sft_run, tmp_path):
    """3 steps at TP2 x PP2, then 3 more at TP1 from that checkpoint (optimizer included)
    equal 6 steps at TP1: the optimizer state reshards with the weights."""
    common = ["model.optim.sched.max_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sft_run(straight, *common, "trainer.sft.max_steps=6")
    sft_run(resumed, *common, "trainer.sft.max_steps=3", "model.tensor_model_parallel_size=2",
            "model.pipeline_model_parallel_size=2", nproc=4)
    sft_run(resumed, *common, "trainer.sft.max_steps=6")
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["train/loss"] == pytest.approx(x["train/loss"], abs=1e-5)
