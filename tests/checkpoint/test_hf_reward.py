"""Reward models and Hugging Face sequence classifiers: import with the head, export back."""

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("dist_world_of_one")


def _hf_classifier(arch, num_labels, out_dir, pad_id=0):
    import transformers as tf

    from hf_models import hf_config

    config = hf_config(arch)
    config.num_labels, config.pad_token_id = num_labels, pad_id
    cls = {"llama": tf.LlamaForSequenceClassification, "qwen2": tf.Qwen2ForSequenceClassification,
           "gpt2": tf.GPT2ForSequenceClassification}[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    return model


def _reward_model_from(hf_dir, **overrides):
    from nemo_aligner.checkpoint.hf import model_cfg_from_hf_dir
    from nemo_aligner.models.reward_model import build_reward_model, restore_reward_model

    cfg = model_cfg_from_hf_dir(hf_dir)
    cfg.update(encoder_seq_length=64, **overrides)
    model = build_reward_model(cfg, cfg["vocab_size"], initialize=False)
    assert restore_reward_model(model, hf_dir) == "backbone"
    return model.eval(), cfg


def _last_token_rewards(model, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        return model(tokens, pos, attention_mask=None)[:, -1]


@pytest.mark.parametrize("arch,labels", [("llama", 1), ("qwen2", 3), ("gpt2", 1)])
def test_sequence_classifier_imports_as_reward_model_and_exports_back(arch, labels, tmp_path):
    from nemo_aligner.checkpoint.hf import export_hf_model
    from transformers import AutoModelForSequenceClassification

    ref = _hf_classifier(arch, labels, tmp_path / "hf")
    model, cfg = _reward_model_from(tmp_path / "hf")
    assert cfg["num_attributes"] == labels
    assert cfg["reward_model_type"] == ("binary_ranking" if labels == 1 else "regression")
    tokens = torch.randint(1, 300, (3, 20), generator=torch.Generator().manual_seed(0))  # no pad id
    with torch.no_grad():
        expected = ref(tokens).logits
    assert (_last_token_rewards(model, tokens) - expected).abs().max() < 1e-4

    export_hf_model(model, cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and config["num_labels"] == labels
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(reloaded.score.weight, ref.score.weight)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def test_reward_model_from_scratch_exports_as_sequence_classifier(tmp_path):
    """A reward model with a trained (random) head: HF scores the last non-pad token equally."""
    from nemo_aligner.checkpoint.hf import export_hf_model
    from nemo_aligner.models.reward_model import build_reward_model
    from transformers import AutoModelForSequenceClassification

    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
               encoder_seq_length=32, vocab_size=200, reward_model_type="binary_ranking", num_attributes=1)
    model = build_reward_model(cfg, 200, seed=5).eval()
    export_hf_model(model, cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["pad_token_id"] = 0
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([tokens, torch.zeros(2, 5, dtype=torch.long)], dim=1)  # right padding
    with torch.no_grad():
        assert (reloaded(padded).logits - _last_token_rewards(model, tokens)).abs().max() < 1e-4


def test_unrepresentable_reward_models_are_refused(tmp_path):
    from nemo_aligner.checkpoint.hf import export_hf_model
    from nemo_aligner.checkpoint.hf_arch import UnsupportedArchitecture
    from nemo_aligner.models.reward_model import build_reward_model

    cfg = dict(num_layers=2, hidden_size=64, num_attention_heads=4, encoder_seq_length=32, vocab_size=200,
               reward_model_type="regression", num_attributes=2)
    model = build_reward_model(cfg, 200, seed=5)
    with torch.no_grad():
        model.reward_head.bias.fill_(0.5)
    with pytest.raises(UnsupportedArchitecture, match="reward_head.bias is nonzero"):
        export_hf_model(model, cfg, tmp_path / "a")
    with pytest.raises(UnsupportedArchitecture, match="reward_reduction=mean"):
        export_hf_model(build_reward_model(dict(cfg, reward_model_type="binary_ranking", num_attributes=1,
                                                reward_reduction="mean"), 200, seed=5),
                        dict(cfg, reward_model_type="binary_ranking", num_attributes=1, reward_reduction="mean"),
                        tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
