"""The distillation loss under TP2 equals TP1 (values and gradients): the student's logits at
the teacher's ids are gathered from the vocabulary shards, never the full vocabulary."""

from pathlib import Path

import pytest
import torch

from helpers import run

WORKER = Path(__file__).parent / "workers" / "distillation_worker.py"


@pytest.mark.slow
def test_distillation_loss_tp2_equals_tp1(tmp_path):
    run(WORKER, [str(tmp_path / "tp1"), "1"], nproc=1)
    run(WORKER, [str(tmp_path / "tp2"), "2"], nproc=2)
    ref = torch.load(tmp_path / "tp1.0.pt", weights_only=True)
    shards = [torch.load(tmp_path / f"tp2.{r}.pt", weights_only=True) for r in range(2)]
    for kind in ("fwd_kl", "bwd_kl"):
        assert ref[kind][1] > 0 and ref[kind][2] > 0
        for r in range(2):
            torch.testing.assert_close(shards[r][kind], ref[kind], rtol=1e-5, atol=1e-5)
    grad = torch.cat([shards[0]["grad"], shards[1]["grad"]], dim=-1)
    torch.testing.assert_close(grad, ref["grad"], rtol=1e-5, atol=1e-6)
