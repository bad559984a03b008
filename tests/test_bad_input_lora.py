"""LoRA settings a user can get wrong: one line naming the key, nothing written."""

import pytest

from test_bad_input import error_line, sft

pytestmark = pytest.mark.slow
LORA = ["model.peft.peft_scheme=lora"]


@pytest.mark.parametrize("override,needle", [
    ("model.peft.lora_tuning.target_modules=[attention_qkv,attn_out]", "unknown module 'attn_out'"),
    ("model.peft.lora_tuning.adapter_dim=0", "model.peft.lora_tuning.adapter_dim=0"),
    ("model.peft.peft_scheme=qlora", "model.peft.peft_scheme='qlora'"),
], ids=["unknown-module", "adapter-dim", "scheme"])
def test_bad_lora_settings(tmp_path, override, needle):
    proc, log_dir = sft(tmp_path, *LORA, override)
    assert proc.returncode == 1 and needle in error_line(proc)
    assert not log_dir.exists()


def test_adapters_of_another_base_model_are_refused(tmp_path, dist_world_of_one):
    from nemo_aligner.checkpoint.distributed import save_checkpoint
    from nemo_aligner.models.gpt import build_gpt_model
    from nemo_aligner.models.lora import LoRASettings, apply_lora

    other = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 encoder_seq_length=64, vocab_size=512, peft={"peft_scheme": "lora", "lora_tuning": {}})
    model = apply_lora(build_gpt_model(other, 512, seed=1), LoRASettings.from_model_cfg(other))
    save_checkpoint(tmp_path / "adapters", [model], other)
    proc, log_dir = sft(tmp_path, *LORA, f"model.peft.restore_from_path={tmp_path / 'adapters'}")
    line = error_line(proc)
    assert proc.returncode == 1 and "hidden_size=32" in line and "hidden_size=64" in line
    assert not log_dir.exists()
