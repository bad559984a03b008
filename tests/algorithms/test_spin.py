"""SPIN: settings and bad input, the pair layout, and runs from the tests' tiny SFT policy:
the first step of every iteration has loss log 2 and zero rewards (the policy is the
reference), the reference stays fixed within an iteration and becomes the policy at its end
(read from the checkpoints, which carry it), resuming mid-iteration equals the uninterrupted
run, the first steps at TP2 equal TP1, and the actual-vs-generated reward margin grows within
an iteration."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, read_metrics, run

from nemo_aligner.algorithms.spin import SPINSettings, spin_pair

SPIN_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_spin.py"


def settings(loop=None, spin=None):
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/gpt_spin.yaml"), {"trainer": {"spin": loop or {}},
                                                                       "model": {"spin": spin or {}}})
    return SPINSettings.from_cfg(cfg)


def test_kl_penalty_per_iteration():
    assert settings({"max_iterations": 3}, {"ref_policy_kl_penalty": 0.5}).kl_penalties == (0.5, 0.5, 0.5)
    s = settings({"max_iterations": 2}, {"ref_policy_kl_penalty": [0.1, 1.0, 5.0]})
    assert s.kl_penalties == (0.1, 1.0) and s.max_iterations == 2


@pytest.mark.parametrize("loop,spin,needle", [
    ({"max_iterations": 0}, {}, r"trainer.spin.max_iterations=0; it must be at least 1"),
    ({"max_iterations": 3}, {"ref_policy_kl_penalty": [0.1, 0.2]}, "has 2 values but trainer.spin.max_iterations=3"),
    ({}, {"ref_policy_kl_penalty": 0}, "every value must be > 0"),
    ({}, {"ref_policy_kl_penalty": "big"}, "must be a number or a list"),
    ({}, {"rollout_micro_batch_size": 0}, "model.spin.rollout_micro_batch_size=0"),
    ({}, {"length_params": {"max_length": None}}, "set model.spin.length_params.max_length"),
])
def test_bad_settings(loop, spin, needle):
    with pytest.raises(ValueError, match=needle):
        settings(loop, spin)


def test_pair_scores_everything_after_the_prompt():
    actual, generated = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([5, 6, 7, 3])
    group = spin_pair(actual, generated, prompt_length=3, index=11)
    a, g = group["sequences"]
    assert a["tokens"].tolist() == [5, 6, 7, 8] and a["labels"].tolist() == [6, 7, 8, 9]
    assert a["loss_mask"].tolist() == [0, 0, 1, 1]  # labels 8 and 9: the actual response
    assert g["labels"].tolist() == [6, 7, 3] and g["loss_mask"].tolist() == [0, 0, 1]
    assert g["shared_prefix"] == 2 and "shared_prefix" not in a  # the prompt's first two inputs are shared
    assert group["sample_ids"].tolist() == [11]


# ------------------------------------------------------------------------------ runs
STEPS = 8  # 32 samples / 8 per step = 4 steps per iteration, 2 iterations


def spin_args(policy, log_dir, data, *extra):
    return [
        f"pretrained_checkpoint.restore_from_path={policy}", f"exp_manager.explicit_log_dir={log_dir}",
        f"model.data.data_prefix.train={data}", "model.data.data_prefix.validation=null",
        "model.global_batch_size=8", "model.micro_batch_size=4", "model.spin.rollout_micro_batch_size=8",
        "model.optim.lr=1e-3", "model.optim.sched.warmup_steps=0", f"model.optim.sched.max_steps={STEPS}",
        "trainer.spin.max_iterations=2", "trainer.spin.max_epochs=1", "trainer.spin.val_check_interval=0",
        "exp_manager.checkpoint_callback_params.save_final_model=false", *extra,
    ]


@pytest.fixture(scope="module")
def spin_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("spin_data") / "sft32.jsonl"
    lines = (ROOT / "data/quickstart/sft_train.jsonl").read_text().splitlines()[:32]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def straight(tiny_policy, spin_data, tmp_path_factory):
    """Two iterations, a checkpoint after every step (all kept)."""
    log_dir = tmp_path_factory.mktemp("spin_straight")
    run(SPIN_SCRIPT, spin_args(tiny_policy, log_dir, spin_data, "trainer.spin.save_interval=1",
                               "exp_manager.checkpoint_callback_params.save_top_k=-1"))
    return log_dir


def plain_tensors(path) -> dict:
    from megatron.core.dist_checkpointing import load_plain_tensors

    return {k: v for k, v in load_plain_tensors(str(path)).items() if torch.is_tensor(v)}


def split(tensors: dict) -> tuple[dict, dict]:
    """(policy weights, reference weights) of a training checkpoint, by model key."""
    ref = {k.removeprefix("reference_policy."): v for k, v in tensors.items() if k.startswith("reference_policy.")}
    return {k: tensors[k] for k in ref}, ref


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_each_iteration_starts_at_log_2_and_the_reference_is_its_start(straight, tiny_policy, dist_world_of_one):
    metrics = read_metrics(straight)
    assert [m["train/iteration"] for m in metrics] == [0] * 4 + [1] * 4
    for m in (metrics[0], metrics[4]):  # iteration 0 step 0, and the first step after the refresh
        assert m["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
        for key in ("rewards_actual_mean", "rewards_generated_mean", "rewards_all_std", "acc"):
            assert m[f"train/{key}"] == pytest.approx(0.0, abs=1e-6), key
    assert any(abs(m["train/rewards_actual_mean"]) > 1e-3 for m in metrics[1:4])
    assert all(m["train/avg_generated_lengths"] > 0 for m in metrics)

    initial = plain_tensors(tiny_policy)
    ckpts = sorted((straight / "checkpoints").iterdir())
    assert len(ckpts) == STEPS
    policy = {}
    for step, path in enumerate(ckpts, start=1):
        policy[step], ref = split(plain_tensors(path))
        expected = {k: initial[k] for k in ref} if step < 4 else policy[4 if step < 8 else 8]
        assert max_diff(ref, expected) == 0.0, f"step {step}: the reference is not the iteration's start"
    assert max_diff(policy[1], {k: initial[k] for k in policy[1]}) > 0  # the policy did move
    assert max_diff(policy[3], policy[4]) > 0

    rows = [json.loads(line) for line in (straight / "generations.jsonl").read_text().splitlines()]
    assert {"step", "iteration", "prompt", "actual", "generated"} <= rows[0].keys()


@pytest.mark.slow
def test_resume_mid_iteration_equals_uninterrupted(straight, tiny_policy, spin_data, tmp_path, dist_world_of_one):
    """Stops after step 3 (iteration 0) and after step 6 (iteration 1: the stored reference is
    the step-4 weights); the pairs generated after each resume, the losses and the last weights
    equal the uninterrupted run's."""
    for stop in (3, 6, STEPS):
        run(SPIN_SCRIPT, spin_args(tiny_policy, tmp_path, spin_data, f"trainer.spin.max_steps={stop}",
                                   "trainer.spin.save_interval=0"))
    a, b = read_metrics(straight), read_metrics(tmp_path)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert y["train/avg_generated_lengths"] == x["train/avg_generated_lengths"]  # the same generations
        assert y["train/loss"] == pytest.approx(x["train/loss"], abs=1e-6)
        assert y["train/rewards_generated_mean"] == pytest.approx(x["train/rewards_generated_mean"], abs=1e-6)
    last_a = split(plain_tensors(sorted((straight / "checkpoints").iterdir())[-1]))
    last_b = split(plain_tensors(sorted((tmp_path / "checkpoints").iterdir())[-1]))
    assert max_diff(last_a[0], last_b[0]) < 1e-6 and max_diff(last_a[1], last_b[1]) < 1e-6


@pytest.mark.slow
def test_first_steps_at_tp2_equal_tp1(straight, tiny_policy, spin_data, tmp_path):
    run(SPIN_SCRIPT, spin_args(tiny_policy, tmp_path, spin_data, "trainer.spin.max_steps=2", "trainer.spin.save_interval=0",
                               "model.tensor_model_parallel_size=2"), nproc=2)
    a, b = read_metrics(straight)[:2], read_metrics(tmp_path)
    assert [m["step"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert y["train/avg_generated_lengths"] == x["train/avg_generated_lengths"]
        for key in ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean"):
            assert y[f"train/{key}"] == pytest.approx(x[f"train/{key}"], abs=1e-5), key
        assert y["train/grad_norm"] == pytest.approx(x["train/grad_norm"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_actual_over_generated_margin_grows_within_an_iteration(tiny_policy, tmp_path):
    """One iteration of 3 epochs over 64 samples (12 steps). Measured: mean margin
    r_actual - r_generated 0.09 over steps 1-4, 0.45 over steps 9-12."""
    data = tmp_path / "sft64.jsonl"
    data.write_text("\n".join((ROOT / "data/quickstart/sft_train.jsonl").read_text().splitlines()[:64]) + "\n")
    run(SPIN_SCRIPT, spin_args(tiny_policy, tmp_path / "run", data, "trainer.spin.max_iterations=1",
                               "trainer.spin.max_epochs=3", "model.global_batch_size=16", "model.micro_batch_size=8",
                               "model.optim.lr=3e-4", "model.optim.sched.max_steps=12", "trainer.spin.save_interval=0"))
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 12
    margin = [m["train/rewards_actual_mean"] - m["train/rewards_generated_mean"] for m in metrics]
    first, last = sum(margin[:4]) / 4, sum(margin[-4:]) / 4
    assert last > first + 0.2, margin
    assert sum(m["train/loss"] for m in metrics[-4:]) / 4 < math.log(2) - 0.02
