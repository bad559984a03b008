"""Log-probs and entropy under TP2 equal TP1 (values and gradients), fp32."""

from pathlib import Path

import pytest
import torch

from helpers import run

WORKER = Path(__file__).parent / "workers" / "logprobs_worker.py"


@pytest.mark.slow
def test_logprobs_and_entropy_tp2_equal_tp1(tmp_path):
    run(WORKER, [str(tmp_path / "tp1"), "1"], nproc=1)
    run(WORKER, [str(tmp_path / "tp2"), "2"], nproc=2)
    ref = torch.load(tmp_path / "tp1.0.pt", weights_only=True)
    shards = [torch.load(tmp_path / f"tp2.{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(shards[r]["logp"], ref["logp"], rtol=0, atol=1e-6)
        torch.testing.assert_close(shards[r]["entropy"], ref["entropy"], rtol=0, atol=1e-6)
    grad = torch.cat([shards[0]["grad"], shards[1]["grad"]], dim=-1)
    torch.testing.assert_close(grad, ref["grad"], rtol=0, atol=1e-6)
