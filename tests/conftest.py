"""Fixtures shared by the test suite; helper functions live in tests/helpers.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SFT_SCRIPT, TINY_POLICY_SFT, TINY_SFT, run  # noqa: E402


@pytest.fixture
def sft_run():
    """``sft_run(log_dir, *overrides, nproc=1)``: the SFT entry point on the tiny model."""

    def _run(log_dir, *overrides, nproc=1, check=True):
        args = [*TINY_SFT, f"exp_manager.explicit_log_dir={log_dir}", *overrides]
        return run(SFT_SCRIPT, args, nproc=nproc, check=check)

    return _run


@pytest.fixture(scope="session")
def dist_world_of_one():
    """torch.distributed + Megatron parallel state for in-process tests (a world of one)."""
    from nemo_aligner.utils import distributed

    distributed.initialize()
    yield


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A tiny SFT model (2 epochs of the quickstart data, ~10 s) to start online RL from."""
    log_dir = tmp_path_factory.mktemp("tiny_policy")
    run(SFT_SCRIPT, [*TINY_POLICY_SFT, f"exp_manager.explicit_log_dir={log_dir}",
                     "exp_manager.checkpoint_callback_params.save_final_model=true"])
    return log_dir / "final_model"
