"""A checkpoint saved at TP2 x PP2 (x DP2) loads at other layouts with the same logits."""

from pathlib import Path

import pytest
import torch

from helpers import run

WORKER = Path(__file__).parent / "workers" / "logits_worker.py"


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_pp2_loads_at_other_layouts(sft_run, tmp_path):
    sft_run(
        tmp_path / "run", "trainer.sft.max_steps=2", "model.tensor_model_parallel_size=2",
        "model.pipeline_model_parallel_size=2",
        "exp_manager.checkpoint_callback_params.save_final_model=true", nproc=8,
    )
    ckpt = tmp_path / "run" / "final_model"
    logits = {}
    for name, (nproc, tp, pp) in {"tp2pp2": (4, 2, 2), "tp1pp1": (1, 1, 1), "tp2pp1": (2, 2, 1)}.items():
        out = tmp_path / f"{name}.pt"
        run(WORKER, [str(ckpt), str(out), str(tp), str(pp)], nproc=nproc)
        logits[name] = torch.load(out, weights_only=True)
    ref = logits["tp2pp2"]
    assert ref.shape == (2, 24, 512) and ref.abs().max() > 0
    for name in ("tp1pp1", "tp2pp1"):
        torch.testing.assert_close(logits[name], ref, rtol=0, atol=1e-5, msg=name)
