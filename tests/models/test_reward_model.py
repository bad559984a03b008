"""The reward head: what it computes, how sequences are reduced, and its checkpoints."""

import pytest
import torch

from nemo_aligner.checkpoint.distributed import save_checkpoint
from nemo_aligner.data.preference import group_collate, make_sequence
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.models.heads import sequence_rewards
from nemo_aligner.models.reward_model import (
    build_reward_model,
    is_reward_checkpoint,
    restore_reward_model,
    reward_model_from_checkpoint,
    reward_settings,
    standardization,
)

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, encoder_seq_length=32, vocab_size=300)


def groups(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=g)
        out.append({"sequences": [make_sequence(ids, torch.ones(n, dtype=torch.long), shift=False)],
                    "sample_ids": torch.tensor([len(out)])})
    return out


def test_head_reads_final_hidden_state_at_last_token_or_mean(dist_world_of_one):
    cfg = dict(TINY, reward_model_type="regression", num_attributes=3)
    model = build_reward_model(cfg, 300, seed=1)
    with torch.no_grad():
        model.reward_head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    captured = {}
    model.reward_head.register_forward_hook(lambda mod, args, out: captured.update(hidden=args[0].detach()))
    batch = group_collate(groups([5, 9, 3]), pad_id=0)
    with torch.no_grad():
        token_rewards = forward_batch(model, batch)
    assert token_rewards.shape == (3, 9, 3) and token_rewards.dtype == torch.float32
    hidden = captured["hidden"].transpose(0, 1)  # [b, s, h], after the final norm
    w, b = model.reward_head.weight, model.reward_head.bias
    lengths = [5, 9, 3]
    last = torch.stack([hidden[i, n - 1] @ w.T + b for i, n in enumerate(lengths)])
    mean = torch.stack([hidden[i, :n].mean(0) @ w.T + b for i, n in enumerate(lengths)])
    torch.testing.assert_close(sequence_rewards(token_rewards, batch, "last"), last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_rewards(token_rewards, batch, "mean"), mean, rtol=1e-5, atol=1e-5)
    assert not hasattr(model, "output_layer")


def test_packed_rewards_equal_unpacked(dist_world_of_one):
    model = build_reward_model(dict(TINY), 300, seed=2)
    gs = groups([5, 9, 3, 7])
    flat = group_collate(gs, pad_id=0)
    packed_group = {"sequences": [s for g in gs for s in g["sequences"]], "packed": True,
                    "sample_ids": torch.arange(4)}
    packed = group_collate([packed_group], pad_id=0, pad_to=32)
    with torch.no_grad():
        for reduction in ("last", "mean"):
            a = sequence_rewards(forward_batch(model, flat), flat, reduction)
            b = sequence_rewards(forward_batch(model, packed), packed, reduction)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_head_dtype_is_configurable(dist_world_of_one):
    model = build_reward_model(dict(TINY, precision="bf16", reward_head_dtype="32"), 300, seed=3)
    assert model.reward_head.weight.dtype == torch.float32
    assert model.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = forward_batch(model, group_collate(groups([4]), pad_id=0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="num_attributes=2 with binary_ranking"):
        reward_settings({"reward_model_type": "binary_ranking", "num_attributes": 2})
    with pytest.raises(ValueError, match="reward_model_type='pairwise'"):
        reward_settings({"reward_model_type": "pairwise"})
    with pytest.raises(ValueError, match="reward_reduction"):
        reward_settings({"reward_reduction": "max"})


def test_outputs_default_to_one_or_the_nine_steerlm_attributes():
    assert reward_settings({"num_attributes": None})["num_attributes"] == 1
    assert reward_settings({"reward_model_type": "regression", "num_attributes": None})["num_attributes"] == 9
    assert reward_settings({"reward_model_type": "regression", "num_attributes": 2})["num_attributes"] == 2


def test_checkpoints_backbone_from_gpt_and_full_roundtrip(tmp_path, dist_world_of_one):
    gpt = build_gpt_model(TINY, 300, seed=4)
    save_checkpoint(tmp_path / "gpt", [gpt], dict(TINY))
    assert not is_reward_checkpoint(tmp_path / "gpt")

    rm = build_reward_model(dict(TINY), 300, seed=5)
    head_before = rm.reward_head.weight.detach().clone()
    assert restore_reward_model(rm, tmp_path / "gpt") == "backbone"
    gpt_params = dict(gpt.named_parameters())
    for name, p in rm.named_parameters():
        if name.startswith("reward_head."):
            continue
        torch.testing.assert_close(p, gpt_params[name], rtol=0, atol=0)
    assert torch.equal(rm.reward_head.weight, head_before)

    rm_cfg = dict(TINY, reward_model_type="binary_ranking", num_attributes=1)
    save_checkpoint(tmp_path / "rm", [rm], rm_cfg)
    assert is_reward_checkpoint(tmp_path / "rm")
    again, cfg = reward_model_from_checkpoint(tmp_path / "rm")
    batch = group_collate(groups([6, 4]), pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(again, batch), forward_batch(rm, batch), rtol=0, atol=0)
    with pytest.raises(Exception, match="is not a reward model"):
        reward_model_from_checkpoint(tmp_path / "gpt")


def test_standardization():
    cfg = {"reward_standardization": {"enable": True, "mean": 1.5, "std": 2.0}}
    mean, std = standardization(cfg)
    assert ((torch.tensor([3.5]) - mean) / std).item() == 1.0
    assert standardization({"reward_standardization": {"enable": False}}) is None
    mean, std = standardization({}, {"enable": True, "mean": [0.0, 1.0], "std": [1.0, 4.0]})
    assert mean.tolist() == [0.0, 1.0] and std.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="std"):
        standardization(cfg, {"std": 0.0})
