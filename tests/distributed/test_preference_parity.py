"""DPO, KTO and reward-model training give the same losses at every parallel layout.

Runs the real entry points under torchrun (gloo) for a few steps (fp32, same global batch,
layout-independent initialization) and compares the metrics with the single-process run.
Also: per-sequence policy and reference log-probs at TP2 equal TP1's.
"""

import math
from pathlib import Path

import pytest
import torch

from helpers import ROOT, read_metrics, run

DPO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_dpo.py"
KTO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_kto.py"
RM_SCRIPT = ROOT / "examples/nlp/gpt/train_reward_model.py"
WORKER = Path(__file__).parent / "workers" / "dpo_logps_worker.py"
STEPS = 3
LAYOUTS = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "dp2": (2, 1, 1), "tp2_pp2_dp2": (8, 2, 2)}


def tiny(algo):
    return [
        "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.encoder_seq_length=64",
        "model.micro_batch_size=2", "model.global_batch_size=8", "model.data.data_prefix.validation=null",
        f"trainer.{algo}.max_steps={STEPS}", f"trainer.{algo}.max_epochs=null", f"trainer.{algo}.val_check_interval=0", f"trainer.{algo}.save_interval=0",
        "exp_manager.checkpoint_callback_params.save_final_model=false", "model.optim.sched.warmup_steps=0",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 bundled pairs (and their 128 KTO lines): small enough to precompute quickly."""
    d = tmp_path_factory.mktemp("data")
    for name, n in (("preference_train.jsonl", 64), ("kto_train.jsonl", 128)):
        lines = (ROOT / "data/quickstart" / name).read_text().splitlines()[:n]
        (d / name).write_text("\n".join(lines) + "\n")
    return d


def metrics(script, algo, log_dir, nproc, tp, pp, *extra):
    run(script, [*tiny(algo), f"exp_manager.explicit_log_dir={log_dir}", f"model.tensor_model_parallel_size={tp}",
                 f"model.pipeline_model_parallel_size={pp}", *extra], nproc=nproc)
    return read_metrics(log_dir)


def assert_same(got, ref, keys):
    assert len(got) == len(ref) == STEPS
    assert ref[-1]["train/loss"] < ref[0]["train/loss"]  # the steps did something
    for step, (g, r) in enumerate(zip(got, ref)):
        for key in keys:
            if key == "train/acc" and step == 0:
                continue  # at step 0 every reward is 0 up to rounding: acc counts rounding-level ties
            assert g[key] == pytest.approx(r[key], abs=1e-5), key
        assert g["train/grad_norm"] == pytest.approx(r["train/grad_norm"], rel=1e-4)
        assert g["consumed_samples"] == r["consumed_samples"]


DPO_KEYS = ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/rewards_rejected_mean", "train/rewards_all_std")


@pytest.fixture(scope="module")
def dpo_reference(data, tmp_path_factory):
    return metrics(DPO_SCRIPT, "dpo", tmp_path_factory.mktemp("dpo_ref"), 1, 1, 1,
                   f"model.data.data_prefix.train={data}/preference_train.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_matches_single_process(layout, data, dpo_reference, tmp_path):
    nproc, tp, pp = LAYOUTS[layout]
    got = metrics(DPO_SCRIPT, "dpo", tmp_path, nproc, tp, pp, f"model.data.data_prefix.train={data}/preference_train.jsonl")
    assert dpo_reference[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy = reference
    assert_same(got, dpo_reference, DPO_KEYS)


@pytest.mark.slow
def test_dpo_swap_reference_at_tp2_pp2_matches_precompute(data, dpo_reference, tmp_path):
    got = metrics(DPO_SCRIPT, "dpo", tmp_path, 4, 2, 2, f"model.data.data_prefix.train={data}/preference_train.jsonl",
                  "model.dpo.ref_logprobs=swap")
    assert_same(got, dpo_reference, DPO_KEYS)


@pytest.mark.slow
def test_packed_dpo_matches_single_process_at_pp2(data, tmp_path):
    extra = [f"model.data.data_prefix.train={data}/preference_train.jsonl", "model.data.packing.enabled=true",
             "model.data.packing.pack_size=256", "model.global_batch_size=4", "model.micro_batch_size=1"]
    ref = metrics(DPO_SCRIPT, "dpo", tmp_path / "ref", 1, 1, 1, *extra)
    assert_same(metrics(DPO_SCRIPT, "dpo", tmp_path / "pp2", 2, 1, 2, *extra), ref, DPO_KEYS)


@pytest.mark.slow
def test_kto_matches_single_process_at_dp2_and_tp2(data, tmp_path):
    extra = [f"model.data.data_prefix.train={data}/kto_train.jsonl"]
    ref = metrics(KTO_SCRIPT, "kto", tmp_path / "ref", 1, 1, 1, *extra)
    keys = ("train/loss", "train/kl", "train/rewards_chosen_mean", "train/rewards_rejected_mean")
    assert_same(metrics(KTO_SCRIPT, "kto", tmp_path / "dp2", 2, 1, 1, *extra), ref, keys)
    assert_same(metrics(KTO_SCRIPT, "kto", tmp_path / "tp2", 2, 2, 1, *extra), ref, keys)


RM_LAYOUTS = {k: LAYOUTS[k] for k in ("tp2", "pp2", "dp2")}
RM_KEYS = ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/rewards_rejected_mean")


@pytest.fixture(scope="module")
def rm_reference(data, tmp_path_factory):
    return metrics(RM_SCRIPT, "rm", tmp_path_factory.mktemp("rm_ref"), 1, 1, 1,
                   f"model.data.data_prefix.train={data}/preference_train.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RM_LAYOUTS))
def test_reward_model_matches_single_process(layout, data, rm_reference, tmp_path):
    nproc, tp, pp = RM_LAYOUTS[layout]
    got = metrics(RM_SCRIPT, "rm", tmp_path, nproc, tp, pp, f"model.data.data_prefix.train={data}/preference_train.jsonl")
    assert_same(got, rm_reference, RM_KEYS)


@pytest.mark.slow
def test_regression_reward_model_matches_single_process_at_tp2(tmp_path):
    lines = (ROOT / "data/quickstart/rm_regression_train.jsonl").read_text().splitlines()[:64]
    (tmp_path / "reg.jsonl").write_text("\n".join(lines) + "\n")
    extra = [f"model.data.data_prefix.train={tmp_path}/reg.jsonl", "model.reward_model_type=regression",
             "model.num_attributes=2", "model.reward_reduction=mean"]
    ref = metrics(RM_SCRIPT, "rm", tmp_path / "ref", 1, 1, 1, *extra)
    assert_same(metrics(RM_SCRIPT, "rm", tmp_path / "tp2", 2, 2, 1, *extra), ref, ("train/loss", "train/num_labels"))


@pytest.mark.slow
def test_policy_and_reference_logps_tp2_equal_tp1(data, tmp_path):
    args = [f"{data}/preference_train.jsonl", str(ROOT / "data/quickstart/tokenizer.json")]
    small = tmp_path / "pairs.jsonl"
    small.write_text("\n".join((data / "preference_train.jsonl").read_text().splitlines()[:12]) + "\n")
    args[0] = str(small)
    run(WORKER, [str(tmp_path / "tp1"), "1", *args], nproc=1)
    run(WORKER, [str(tmp_path / "tp2"), "2", *args], nproc=2)
    ref = torch.load(tmp_path / "tp1.0.pt", weights_only=True)
    assert ref["step0_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert not torch.equal(ref["ref"], ref["policy"])
    for rank in range(2):
        got = torch.load(tmp_path / f"tp2.{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["ref"], ref["ref"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["policy"], ref["policy"], rtol=0, atol=1e-5)
        assert got["step0_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
