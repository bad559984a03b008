"""LoRA adapters: step 0 equals the base model, the update is (alpha / r) B A, adapters switch
off, merge folds them in, only adapters train, and bad settings are named."""

import pytest
import torch

from nemo_aligner.models.forward import full_logits
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.models.lora import (
    LoRAConfigError,
    LoRASettings,
    adapted_linears,
    adapters_disabled,
    apply_lora,
    merge_lora,
    merged_weights,
    trainable_fraction,
)

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, encoder_seq_length=32)
TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def lora_cfg(**tuning):
    return dict(BASE, peft={"peft_scheme": "lora", "lora_tuning": dict({"target_modules": ["all"], "adapter_dim": 4,
                                                                        "alpha": 8}, **tuning)})


def lora_model(seed=1, **tuning):
    cfg = lora_cfg(**tuning)
    return apply_lora(build_gpt_model(cfg, 300, seed=seed), LoRASettings.from_model_cfg(cfg), seed=seed)


def randomize_b(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapted_linears(model):
            w = adapter.linear_out.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.05)


def test_step_zero_equals_base_and_only_adapters_train(dist_world_of_one):
    base = build_gpt_model(BASE, 300, seed=1)
    model = lora_model()
    assert torch.equal(full_logits(model, TOKENS), full_logits(base, TOKENS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B, four linears, two layers
    assert 0 < trainable_fraction(model) < 0.2


def test_update_is_scaled_low_rank_product_on_each_linear(dist_world_of_one):
    model = lora_model()
    randomize_b(model)
    layer = model.decoder.layers[0]
    x = torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(3))
    adapter = layer.lora.linear_qkv
    base_out, _ = layer.self_attention.linear_qkv(x)
    with adapters_disabled(model):
        plain, _ = layer.self_attention.linear_qkv(x)
    a, b = adapter.linear_in.weight, adapter.linear_out.weight
    expected = plain + (8 / 4) * x @ a.T @ b.T  # alpha / r = 2
    torch.testing.assert_close(base_out, expected, rtol=1e-5, atol=1e-6)
    with adapters_disabled(model):
        assert torch.equal(full_logits(model, TOKENS), full_logits(build_gpt_model(BASE, 300, seed=1), TOKENS))


def test_merge_gives_the_same_function_with_plain_weights(dist_world_of_one):
    model = lora_model()
    randomize_b(model)
    with_adapters = full_logits(model, TOKENS)
    merged = merged_weights(model)
    assert not any(".lora." in n for n in merged)
    merge_lora(model)
    torch.testing.assert_close(full_logits(model, TOKENS), with_adapters, rtol=1e-4, atol=1e-4)
    for name, param in model.named_parameters():
        if name in merged:
            torch.testing.assert_close(param, merged[name])


def test_layer_selection_and_module_groups(dist_world_of_one):
    model = lora_model(target_modules=["attention"], layer_selection=[2])
    adapted = [(layer.layer_number, sorted(dict(layer.lora.named_children())))
               for layer in model.decoder.layers if hasattr(layer, "lora")]
    assert adapted == [(2, ["linear_proj", "linear_qkv"])]
    settings = LoRASettings.from_model_cfg(lora_cfg(target_modules=["mlp", "attention_qkv"], alpha=None))
    assert settings.linears == ("linear_fc1", "linear_fc2", "linear_qkv") and settings.scale == 1.0


@pytest.mark.parametrize("tuning,needle", [
    ({"target_modules": ["attention_q"]}, "unknown module 'attention_q'"),
    ({"adapter_dim": 0}, "adapter_dim=0"),
    ({"column_init_method": "orthogonal"}, "column_init_method='orthogonal'"),
    ({"layer_selection": [3]}, r"layer_selection has \[3\]"),
])
def test_bad_settings_are_named(tuning, needle):
    with pytest.raises(LoRAConfigError, match=needle):
        LoRASettings.from_model_cfg(lora_cfg(**tuning))
    assert LoRASettings.from_model_cfg(BASE) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_hf_export_loads_in_transformers_with_our_adapted_logits(arch, tmp_path, dist_world_of_one):
    """An imported HF model with random adapters on every linear: the exported merged weights
    load in ``transformers`` and give our logits with the adapters on."""
    from hf_models import hf_class, make_hf_model, reference_logits

    from nemo_aligner.checkpoint.hf import export_hf_model, import_hf_model

    ref = make_hf_model(arch, tmp_path / "src")
    model, cfg = import_hf_model(tmp_path / "src")
    cfg = dict(cfg, peft=lora_cfg(alpha=16)["peft"])
    apply_lora(model, LoRASettings.from_model_cfg(cfg), seed=3)
    randomize_b(model)
    vocab = ref.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = full_logits(model.eval(), tokens)[..., :vocab]
    assert (ours - reference_logits(ref, tokens)).abs().max() > 1e-2  # the adapters matter
    merge_lora(model)
    export_hf_model(model, cfg, tmp_path / "out")
    reloaded = hf_class(arch).from_pretrained(tmp_path / "out").eval()
    assert (reference_logits(reloaded, tokens) - ours).abs().max().item() < 1e-4


def test_checkpoint_holds_the_adapters_and_restores_them(tmp_path, dist_world_of_one):
    from torch.distributed.checkpoint import FileSystemReader

    from nemo_aligner.checkpoint.distributed import load_checkpoint, save_checkpoint

    model = lora_model()
    randomize_b(model, seed=4)
    logits = full_logits(model, TOKENS)
    save_checkpoint(tmp_path / "ckpt", [model], lora_cfg())
    keys = [k for k in FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
            if not k.endswith("_extra_state") and "_extra_state/" not in k]
    assert keys and all(".lora." in k for k in keys)  # no base weight
    fresh = lora_model()  # same base (seed 1), adapters at their initial values
    assert not torch.equal(full_logits(fresh, TOKENS), logits)
    load_checkpoint(tmp_path / "ckpt", [fresh])
    assert torch.equal(full_logits(fresh, TOKENS), logits)
