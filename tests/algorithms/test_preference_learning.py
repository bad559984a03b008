"""Short runs on the bundled synthetic preference task (the chosen response follows the
instruction: uppercase the words, or say them twice) raise held-out preference accuracy far
above chance; the trained reward model's scores, from the scoring command, rank the
held-out pairs the same way as its validation."""

import json
import math

import pytest

from helpers import ROOT, read_metrics, run

pytestmark = pytest.mark.slow
DPO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_dpo.py"
KTO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_kto.py"
RM_SCRIPT = ROOT / "examples/nlp/gpt/train_reward_model.py"
SCORE_SCRIPT = ROOT / "examples/nlp/gpt/score_reward_model.py"
HELD_OUT = ROOT / "data/quickstart/preference_val.jsonl"  # no prompt of it is in the training file


def small(algo, log_dir, seed, steps=20):
    return [
        f"exp_manager.explicit_log_dir={log_dir}", f"seed={seed}", "model.num_layers=2", "model.hidden_size=64",
        "model.ffn_hidden_size=128", "model.global_batch_size=16", "model.micro_batch_size=8",
        f"trainer.{algo}.max_steps={steps}", f"trainer.{algo}.val_check_interval={steps}", f"trainer.{algo}.save_interval=0",
    ]


def held_out(metrics):
    last = metrics[-1]
    assert "val/acc" in last and last["val/num_pairs"] == 100
    return last


@pytest.mark.parametrize("seed,packing", [(1, False), (2, False), (3, True)], ids=["seed1", "seed2", "seed3-packed"])
def test_dpo_raises_held_out_preference_accuracy(tmp_path, seed, packing):
    extra = ["model.data.packing.enabled=true", "model.global_batch_size=2", "model.micro_batch_size=1"] if packing else []
    run(DPO_SCRIPT, [*small("dpo", tmp_path, seed), "exp_manager.checkpoint_callback_params.save_final_model=false", *extra])
    metrics = read_metrics(tmp_path)
    assert metrics[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy = reference
    last = held_out(metrics)
    assert last["val/acc"] > 0.8  # chance is 0.5 (and 0 at step 0, where every reward is 0)
    assert last["val/loss"] < math.log(2) - 0.05
    assert last["val/rewards_chosen_mean"] > 0 > last["val/rewards_rejected_mean"]


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_kto_separates_held_out_desirable_from_undesirable(tmp_path, packing):
    """Unpaired KTO on the same task (kto_*.jsonl: each response labelled desirable or not):
    held-out desirable responses gain implied reward over undesirable ones."""
    extra = ["model.data.packing.enabled=true", "model.global_batch_size=2", "model.micro_batch_size=1"] if packing else []
    run(KTO_SCRIPT, [*small("kto", tmp_path, seed=1, steps=30), "exp_manager.checkpoint_callback_params.save_final_model=false", *extra])
    metrics = read_metrics(tmp_path)
    assert metrics[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)  # step 0: every reward and the KL estimate are 0
    last = metrics[-1]
    assert last["val/num_samples"] == 200
    assert last["val/rewards_chosen_mean"] - last["val/rewards_rejected_mean"] > 0.1
    assert last["val/loss"] < 0.5 - 0.01


@pytest.mark.parametrize("algo", ["dpo", "rm"])
def test_how_a_step_is_cut_into_micro_batches_changes_no_result(tmp_path, algo):
    """Padding-free micro-batches filled to a token budget (the default) or of exactly
    micro_batch_size pairs (``micro_batch_tokens=0``): the same losses, accuracies and gradient
    norms step by step, the same validation."""
    script = {"dpo": DPO_SCRIPT, "rm": RM_SCRIPT}[algo]
    runs = {}
    for name, tokens in (("budget", "null"), ("fixed", "0")):
        args = small(algo, tmp_path / name, seed=1, steps=3)
        args = [a for a in args if "batch_size" not in a] + ["model.global_batch_size=8", "model.micro_batch_size=1",
                                                            f"model.data.micro_batch_tokens={tokens}", "model.optim.lr=1e-3",
                                                            "model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=0"]
        run(script, [*args, "exp_manager.checkpoint_callback_params.save_final_model=false",
                     f"trainer.{algo}.limit_val_batches=2"])
        runs[name] = read_metrics(tmp_path / name)
    for n, (a, b) in enumerate(zip(runs["budget"], runs["fixed"])):
        # At step 0 every reward is 0 up to float rounding, which differs between the cuts.
        keys = ["train/loss", "train/grad_norm", "val/loss"] + (["train/acc", "val/acc"] if n else [])
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert len(runs["budget"]) == len(runs["fixed"]) >= 3 and "val/loss" in runs["budget"][-1]
    assert runs["budget"][-1]["train/loss"] != pytest.approx(runs["budget"][0]["train/loss"], abs=1e-4)  # it trained


def test_reward_model_ranks_held_out_pairs_and_scores_them(tmp_path):
    run(RM_SCRIPT, small("rm", tmp_path / "rm", seed=1))
    last = held_out(read_metrics(tmp_path / "rm"))
    assert last["val/acc"] > 0.7
    assert last["val/loss"] < 0.5  # from ~log 2 at a random init

    model = tmp_path / "rm" / "final_model"
    out = tmp_path / "scored.jsonl"
    run(SCORE_SCRIPT, [f"pretrained_checkpoint.restore_from_path={model}", f"input_file={HELD_OUT}", f"output_file={out}"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 100 and all(line["prompt"] for line in lines)
    acc = sum(x["reward_chosen"] > x["reward_rejected"] for x in lines) / len(lines)
    assert acc == pytest.approx(last["val/acc"])
    mean_chosen = sum(x["reward_chosen"] for x in lines) / len(lines)
    assert mean_chosen == pytest.approx(last["val/rewards_chosen_mean"], abs=1e-4)

    std_out = tmp_path / "standardized.jsonl"
    run(SCORE_SCRIPT, [f"pretrained_checkpoint.restore_from_path={model}", f"input_file={HELD_OUT}",
                       f"output_file={std_out}", "reward_standardization.enable=true",
                       "reward_standardization.mean=1.5", "reward_standardization.std=2.0"])
    for raw, std in zip(lines, (json.loads(x) for x in std_out.read_text().splitlines())):
        assert std["reward_chosen"] == pytest.approx((raw["reward_chosen"] - 1.5) / 2.0, abs=1e-5)


def test_regression_reward_model_fits_rated_attributes(tmp_path):
    """Labels: [follows the rule (0/1), word count (-100 on a quarter)]. The loss (MSE per
    rated attribute) ends well below what the best constant prediction achieves."""
    data = ROOT / "data/quickstart/rm_regression_train.jsonl"
    labels = [json.loads(x)["label"] for x in data.read_text().splitlines()]
    sse, n = 0.0, 0
    for a in range(2):
        values = [lab[a] for lab in labels if lab[a] != -100]
        mean = sum(values) / len(values)
        sse += sum((v - mean) ** 2 for v in values)
        n += len(values)
    constant_mse = sse / n

    run(RM_SCRIPT, [*small("rm", tmp_path, seed=1, steps=80), "model.reward_model_type=regression",
                    "model.num_attributes=2", f"model.data.data_prefix.train={data}",
                    "model.data.data_prefix.validation=null", "trainer.rm.val_check_interval=0",
                    "exp_manager.checkpoint_callback_params.save_final_model=false"])
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    assert sum(losses[-10:]) / 10 < 0.6 * constant_mse
