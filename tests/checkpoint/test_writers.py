"""Small checkpoints written in this process, large ones by Megatron's forked writers: the
same files either way, loadable, and a failed write reported the same way."""

import multiprocessing.context

import pytest
import torch

from nemo_aligner.checkpoint import writers
from nemo_aligner.checkpoint.distributed import CheckpointWriteError, load_checkpoint, save_checkpoint
from nemo_aligner.models.gpt import build_gpt_model

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, encoder_seq_length=16, vocab_size=100)


@pytest.fixture
def forks(monkeypatch):
    """The processes started while saving (Megatron's writers fork through this context)."""
    started = []
    original = multiprocessing.context.ForkProcess._Popen

    def popen(process_obj):
        started.append(process_obj)
        return original(process_obj)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "_Popen", staticmethod(popen))
    return started


def _roundtrip(path, model):
    other = build_gpt_model(CFG, 100, seed=6)
    load_checkpoint(path, [other])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


@pytest.mark.parametrize("limit,forked", [(writers.IN_PROCESS_WRITE_BYTES, False), (0, True)])
def test_written_here_or_by_forked_writers_by_size(dist_world_of_one, tmp_path, monkeypatch, forks, limit, forked):
    monkeypatch.setattr(writers, "IN_PROCESS_WRITE_BYTES", limit)
    model = build_gpt_model(CFG, 100, seed=5)
    path = save_checkpoint(tmp_path / "ck", [model], CFG, None, {"step": 3})
    assert bool(forks) == forked
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__0_1.distcp"]
    _roundtrip(path, model)


def test_a_failed_in_process_write_is_reported_and_cleaned_up(dist_world_of_one, tmp_path, monkeypatch, forks):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def failing_write_item(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", failing_write_item)
    model = build_gpt_model(CFG, 100, seed=5)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        save_checkpoint(tmp_path / "ck", [model], CFG, None, {"step": 3})
    assert not forks and not list(tmp_path.iterdir())  # no partial directory left
