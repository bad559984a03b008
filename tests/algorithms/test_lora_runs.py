"""LoRA through the real entry points: DPO's reference is the model with its adapters off
(precomputed before training or computed at each step: the same numbers), GRPO generates from
merged weights (the engine's log-probs equal the training model's), and checkpoints hold only
the adapters while the final model is merged."""

import math

import pytest
import torch

from helpers import DPO_SCRIPT, GRPO_SCRIPT, read_metrics, rl_args, run

pytestmark = pytest.mark.slow
LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
        "model.peft.lora_tuning.adapter_dim=8"]


def _adapter_keys(path):
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return [k for k in keys if k.startswith(("decoder", "embedding", "output_layer"))]


def test_lora_dpo_reference_is_the_base_model(tiny_policy, tmp_path):
    common = [f"pretrained_checkpoint.restore_from_path={tiny_policy}", *LORA, "model.global_batch_size=8",
              "model.micro_batch_size=4", "model.optim.lr=1e-2", "trainer.dpo.max_steps=6",
              "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=6",
              "exp_manager.checkpoint_callback_params.save_final_model=true"]
    for mode in ("precompute", "swap"):
        run(DPO_SCRIPT, [*common, f"model.dpo.ref_logprobs={mode}", f"exp_manager.explicit_log_dir={tmp_path / mode}"])
    pre, swap = read_metrics(tmp_path / "precompute"), read_metrics(tmp_path / "swap")
    assert pre[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: adapters at B = 0
    assert pre[0]["train/rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6)
    assert abs(pre[-1]["train/rewards_chosen_mean"]) > 1e-3  # the adapters moved the policy off its reference
    # Reference log-probs precomputed from the base model before training == the adapters-off
    # forward at each step, after the adapters have trained.
    # (Up to float32 rounding: the precomputed sums, ~100 nats, come from other micro-batches
    # than the step's, and six steps at lr 1e-2 carry a rounding difference along.)
    for a, b in zip(pre, swap):
        for key in ("train/loss", "train/rewards_chosen_mean", "train/rewards_rejected_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=5e-6), key
    ckpt = next((tmp_path / "swap" / "checkpoints").iterdir())
    assert _adapter_keys(ckpt) and all(".lora." in k for k in _adapter_keys(ckpt))
    final = _adapter_keys(tmp_path / "swap" / "final_model")
    assert final and not any(".lora." in k for k in final)  # merged: a plain model


def test_lora_grpo_generates_from_merged_weights(tiny_policy, tmp_path):
    run(GRPO_SCRIPT, rl_args("grpo", tiny_policy, tmp_path, *LORA, "trainer.grpo.max_steps=3",
                             "trainer.grpo.val_check_interval=0", "model.optim.lr=1e-2"))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # the engine's copy (merged) samples what the training model (adapters on) scores
        assert m["train_rollouts/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4)
    assert metrics[0]["train_rollouts/init_policy_kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0 at step 1
    assert metrics[-1]["train_rollouts/init_policy_kl"] > 1e-6  # reference = adapters off, policy moved


def test_lora_sft_learns_resumes_and_exports_merged(tmp_path, dist_world_of_one):
    """From random weights (frozen embeddings and output layer: LoRA learns slowly there, but
    clearly); saved at step 15, resumed from the adapters-only checkpoint == uninterrupted; the
    adapter checkpoint converts to a Hugging Face model with the adapters merged."""
    import shutil

    import transformers

    from helpers import ROOT, SFT_SCRIPT, TINY_SFT
    from nemo_aligner.models.forward import full_logits
    from nemo_aligner.utils.setup import model_from_checkpoint

    common = [*TINY_SFT, *LORA, "model.peft.lora_tuning.adapter_dim=16", "model.optim.lr=2e-2",
              "model.micro_batch_size=8", "model.global_batch_size=16", "trainer.sft.max_steps=30",
              "trainer.sft.save_interval=15"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(SFT_SCRIPT, [*common, f"exp_manager.explicit_log_dir={straight}",
                     "exp_manager.checkpoint_callback_params.save_final_model=true"])
    losses = [m["train/loss"] for m in read_metrics(straight)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.15, losses
    (resumed / "checkpoints").mkdir(parents=True)
    half = straight / "checkpoints" / "step=0000015"
    shutil.copytree(half, resumed / "checkpoints" / half.name)
    run(SFT_SCRIPT, [*common, f"exp_manager.explicit_log_dir={resumed}"])
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == list(range(16, 31))
    for a, b in zip(read_metrics(straight)[15:], again):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)

    hf_dir = tmp_path / "hf"
    run(ROOT / "examples/nlp/convert/mcore_to_hf.py", ["--input", str(half), "--output", str(hf_dir)])
    ours = model_from_checkpoint(half)  # base (seeded) + adapters, merged
    tokens = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = full_logits(ours, tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        got = hf(tokens).logits
    vocab = got.shape[-1]
    assert (got - expected[..., :vocab]).abs().max().item() < 1e-4
    # The last adapter checkpoint (its base drawn again from the seed) == the merged final model.
    last = full_logits(model_from_checkpoint(straight / "checkpoints" / "step=0000030"), tokens)
    torch.testing.assert_close(last, full_logits(model_from_checkpoint(straight / "final_model"), tokens),
                               rtol=1e-5, atol=1e-5)


def test_lora_grpo_at_pp2_refits_the_folded_engine_with_merged_weights(tiny_policy, tmp_path):
    """Under PP the engine holds every layer, gathered from the stages at each refit; with LoRA
    the stages send merged weights."""
    run(GRPO_SCRIPT, rl_args("grpo", tiny_policy, tmp_path, *LORA, "trainer.grpo.max_steps=2",
                             "trainer.grpo.val_check_interval=0", "model.optim.lr=1e-2",
                             "model.pipeline_model_parallel_size=2"), nproc=2)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["train_rollouts/init_policy_kl"] > 1e-6
    for m in metrics:
        assert m["train_rollouts/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4)
