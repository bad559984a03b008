"""The critic's starting points: a Hugging Face causal LM gives the backbone and a value head at
zero; a Hugging Face sequence classifier (a reward model) keeps its head, so its values are the
classifier's scores at every position."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("dist_world_of_one")


def critic_from(hf_dir):
    from nemo_aligner.algorithms.critic import build_critic_model
    from nemo_aligner.checkpoint.hf import model_cfg_from_hf_dir
    from nemo_aligner.models.reward_model import read_reward_model_config

    try:
        model_cfg, is_rm = read_reward_model_config(hf_dir), True
    except Exception:  # noqa: BLE001 -- a causal LM
        model_cfg, is_rm = model_cfg_from_hf_dir(hf_dir), False
    model_cfg.update(encoder_seq_length=64, reward_model_type="binary_ranking", num_attributes=1)
    cfg = {"pretrained_checkpoint": {"restore_from_path": str(hf_dir)}, "seed": 0}
    model, _ = build_critic_model(cfg, model_cfg, int(model_cfg["vocab_size"]), zero_head=not is_rm)
    return model.eval(), is_rm


def values(model, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        return model(tokens, pos, attention_mask=None)[..., 0]


TOKENS = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_critic_from_a_causal_lm_starts_at_zero(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("llama", tmp_path / "lm")
    model, is_rm = critic_from(tmp_path / "lm")
    assert not is_rm
    assert torch.count_nonzero(values(model, TOKENS)) == 0
    assert model.module.embedding.word_embeddings.weight.abs().sum() > 0  # the backbone was loaded


def test_critic_from_a_sequence_classifier_keeps_its_head(tmp_path):
    import transformers as tf

    from hf_models import hf_config

    config = hf_config("llama")
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    ref = tf.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "rm")
    model, is_rm = critic_from(tmp_path / "rm")
    assert is_rm
    with torch.no_grad():
        expected = ref.model(TOKENS).last_hidden_state @ ref.score.weight.T  # the score at every position
    assert (values(model, TOKENS) - expected[..., 0]).abs().max() < 1e-4
