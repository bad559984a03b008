"""The first SFT steps give the same loss at every parallel layout (fp32, same global batch).

Runs the real entry point under torchrun (gloo). Weights are initialized independently of
the layout, the global batch is the same whatever the data-parallel size, and the loss is a
per-token mean over the whole global batch, so every layout must agree to float rounding.
"""

import pytest

from helpers import SFT_SCRIPT, TINY_SFT, read_metrics, run

LAYOUTS = {  # name: (nproc, TP, PP)
    "tp2": (2, 2, 1),
    "pp2": (2, 1, 2),
    "dp2": (2, 1, 1),
    "tp2_pp2_dp2": (8, 2, 2),
}
STEPS = 3


GPT2_STYLE = [
    "model.normalization=layernorm", "model.activation=gelu", "model.bias=true",
    "model.position_embedding_type=learned_absolute", "model.share_embeddings_and_output_weights=true",
    "model.num_query_groups=4",
]


def sft_metrics(log_dir, nproc, tp, pp, extra=()):
    run(SFT_SCRIPT, [
        *TINY_SFT, f"exp_manager.explicit_log_dir={log_dir}", f"trainer.sft.max_steps={STEPS}",
        f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}", *extra,
    ], nproc=nproc)
    return read_metrics(log_dir)


def assert_same_run(metrics, reference):
    assert len(metrics) == len(reference) == STEPS
    assert reference[-1]["train/loss"] < reference[0]["train/loss"]  # the steps did something
    for got, ref in zip(metrics, reference):
        assert got["train/loss"] == pytest.approx(ref["train/loss"], abs=1e-5)
        assert got["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)
        assert got["consumed_samples"] == ref["consumed_samples"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return sft_metrics(tmp_path_factory.mktemp("ref"), 1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_loss_matches_single_process(layout, reference, tmp_path):
    nproc, tp, pp = LAYOUTS[layout]
    assert_same_run(sft_metrics(tmp_path, nproc, tp, pp), reference)


@pytest.mark.slow
def test_gpt2_style_tied_embeddings_match_at_tp2_pp2_dp2(tmp_path):
    """Tied embeddings under PP: the last stage's copy starts equal and stays in sync."""
    reference = sft_metrics(tmp_path / "ref", 1, 1, 1, GPT2_STYLE)
    assert_same_run(sft_metrics(tmp_path / "par", 8, 2, 2, GPT2_STYLE), reference)


@pytest.mark.slow
def test_lora_sft_matches_single_process_at_tp2_pp2(tmp_path):
    """LoRA on every linear (B drawn at random so A trains from step 1): sharded adapters, the
    gradient norm over replicated and sharded adapter matrices, and PP stages agree with TP1."""
    lora = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[all]",
            "model.peft.lora_tuning.adapter_dim=4", "model.peft.lora_tuning.row_init_method=normal",
            "model.optim.lr=1e-2"]
    reference = sft_metrics(tmp_path / "ref", 1, 1, 1, lora)
    assert_same_run(sft_metrics(tmp_path / "tp2_pp2", 4, 2, 2, lora), reference)
