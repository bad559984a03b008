"""Checkpoint naming, top-k retention and atomic writes (single process, real model)."""

import pytest
import torch

from nemo_aligner.checkpoint.distributed import (
    CheckpointError, CheckpointManager, is_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint,
)
from nemo_aligner.models.gpt import build_gpt_model

CFG = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, encoder_seq_length=16, vocab_size=100)


@pytest.fixture
def model(dist_world_of_one):
    return build_gpt_model(CFG, 100, seed=5)


def test_save_and_load_roundtrip(model, tmp_path):
    path = save_checkpoint(tmp_path / "ck", [model], CFG, None, {"step": 7})
    assert is_checkpoint(path) and read_trainer_state(path)["step"] == 7
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary directory was renamed away
    other = build_gpt_model(CFG, 100, seed=6)
    assert not torch.equal(other.embedding.word_embeddings.weight, model.embedding.word_embeddings.weight)
    load_checkpoint(path, [other])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_top_k_keeps_best_and_latest(model, tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1, monitor="val_loss", mode="min")
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
        manager.save([model], CFG, None, {"step": step, "metrics": {"val_loss": loss}})
    kept = sorted(read_trainer_state(p)["step"] for p in manager.checkpoints())
    assert kept == [2, 4]  # the best (val_loss 1.0) and the latest
    assert read_trainer_state(manager.latest())["step"] == 4
    assert "val_loss=1.0000" in str(sorted(manager.checkpoints())[0])


def test_resuming_from_exported_model_is_refused(model, tmp_path):
    path = save_checkpoint(tmp_path / "final", [model], CFG, None, {"step": 1})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, [model], optimizer=object())


def test_not_a_checkpoint(model, tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path, [model])


def test_one_rank_save_and_load_gather_nothing_through_gloo(dist_world_of_one, tmp_path, monkeypatch):
    """In a world of one, saving and loading a training checkpoint (model, distributed
    optimizer state, RNG) run their gathers in place: a gloo all-gather copies on a worker
    thread, which then keeps an OpenMP pool and halves the speed of every later step."""
    from torch.distributed import ProcessGroup

    from nemo_aligner.utils.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp

    cfg = dict(CFG, optim={"name": "adamw", "lr": 1e-2, "use_distributed_optimizer": True,
                           "sched": {"name": "Constant", "warmup_steps": 0}})
    model = wrap_ddp(build_gpt_model(CFG, 100, seed=5), cfg)
    optimizer = build_optimizer([model], cfg)
    tokens = torch.randint(0, 100, (2, 16))
    model(tokens, torch.arange(16).expand(2, -1), attention_mask=None).float().logsumexp(-1).sum().backward()
    model.finish_grad_sync()
    optimizer_step(optimizer, build_scheduler(optimizer, cfg, max_steps=1))
    gathers = []
    for name in ("allgather", "allgather_coalesced", "_allgather_base", "gather"):
        original = getattr(ProcessGroup, name)
        monkeypatch.setattr(ProcessGroup, name, lambda self, *a, _f=original, _n=name, **k: gathers.append(_n) or _f(self, *a, **k))
    path = save_checkpoint(tmp_path / "ck", [model], cfg, optimizer, {"step": 1})
    other = wrap_ddp(build_gpt_model(CFG, 100, seed=6), cfg)
    other_optimizer = build_optimizer([other], cfg)
    load_checkpoint(path, [other], optimizer=other_optimizer)
    assert gathers == []
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)

    def moments(opt):
        return [state[key] for inner in opt.chained_optimizers for group in inner.optimizer.param_groups
                for p in group["params"] for state in [inner.optimizer.state[p]] for key in ("exp_avg", "exp_avg_sq")]

    assert len(moments(optimizer)) == 2 * len(list(model.parameters()))
    for a, b in zip(moments(optimizer), moments(other_optimizer)):
        assert a.abs().sum() > 0 and torch.equal(a, b)
