"""Generation under a pipeline-parallel trainer: the engine folds the stages into data
parallelism (every rank holds all layers, gathered at refit) and generates exactly what a
PP=1 engine generates, before and after an in-place weight update."""

from pathlib import Path

import pytest
import torch

from helpers import run

WORKER = Path(__file__).parent / "workers" / "generation_pp_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_folded_pipeline_engine_equals_pp1(tmp_path, tp, pp):
    run(WORKER, [str(tmp_path / "ref"), "1", "1"], nproc=1)
    run(WORKER, [str(tmp_path / "pp"), str(tp), str(pp)], nproc=tp * pp)
    ref = torch.load(tmp_path / "ref.0.pt", weights_only=True)
    assert ref["before_lean"] != ref["after_lean"]  # the update changes the samples
    for rank in range(tp * pp):
        got = torch.load(tmp_path / f"pp.{rank}.pt", weights_only=True)
        assert got["layers"] == 4 and got["in_place"]
        for key in ("before_lean", "before_megatron", "after_lean", "after_megatron"):
            assert got[key] == ref[key], (rank, key)
