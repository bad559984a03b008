"""Hugging Face import/export on one process: logits parity with ``transformers`` and
bit-exact round trips, for every supported architecture."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_models import ARCHS, hf_class, make_hf_model, reference_logits

pytestmark = pytest.mark.usefixtures("dist_world_of_one")


def _tokens(vocab, b=2, s=40, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _our_logits(model, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        return model(tokens, pos, attention_mask=None).float()


def _all_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=ARCHS)
def hf_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, d, make_hf_model(request.param, d)


def test_import_logits_match_transformers(hf_model):
    from nemo_aligner.checkpoint.hf import import_hf_model

    arch, d, ref_model = hf_model
    model, cfg = import_hf_model(d)
    vocab = ref_model.config.vocab_size
    tokens = _tokens(vocab)
    ours = _our_logits(model.eval(), tokens)
    ref = reference_logits(ref_model, tokens)
    assert (ours[..., :vocab] - ref).abs().max().item() < 1e-4
    assert cfg["hf_config"]["model_type"] == arch
    # Padded ids (vocabulary rounded up to 128) never get probability mass.
    if ours.shape[-1] > vocab:
        assert ours[..., vocab:].max().item() < -1e30
        logp = torch.log_softmax(ours, -1)[..., :vocab]
        torch.testing.assert_close(logp, torch.log_softmax(ref, -1), atol=1e-4, rtol=0)


def test_export_round_trip_is_bitwise_and_loads_in_transformers(hf_model, tmp_path):
    from nemo_aligner.checkpoint.hf import export_hf_model, import_hf_model

    arch, d, ref_model = hf_model
    model, cfg = import_hf_model(d)
    export_hf_model(model, cfg, tmp_path / "out")
    original, exported = _all_tensors(d), _all_tensors(tmp_path / "out")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name], tensor), name
    reloaded = hf_class(arch).from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(ref_model.config.vocab_size, seed=1)
    assert torch.equal(reference_logits(reloaded, tokens), reference_logits(ref_model, tokens))


def test_sharded_checkpoint_with_index(tmp_path):
    """Export above max_shard_size writes several files and an index; both sides read it."""
    from nemo_aligner.checkpoint.hf import export_hf_model, import_hf_model

    ref_model = make_hf_model("llama", tmp_path / "src")
    model, cfg = import_hf_model(tmp_path / "src")
    export_hf_model(model, cfg, tmp_path / "sharded", max_shard_size=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "sharded" / f).is_file() for f in files)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    tokens = _tokens(300)
    reloaded = hf_class("llama").from_pretrained(tmp_path / "sharded").eval()
    assert torch.equal(reference_logits(reloaded, tokens), reference_logits(ref_model, tokens))
    model2, _ = import_hf_model(tmp_path / "sharded")
    assert torch.equal(_our_logits(model2.eval(), tokens), _our_logits(model.eval(), tokens))


def test_bf16_checkpoint_round_trip_is_bitwise(tmp_path):
    from nemo_aligner.checkpoint.hf import export_hf_model, import_hf_model

    make_hf_model("qwen2", tmp_path / "src", dtype=torch.bfloat16)
    model, cfg = import_hf_model(tmp_path / "src", precision="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    export_hf_model(model, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original, exported = _all_tensors(tmp_path / "src"), _all_tensors(tmp_path / "out")
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_pytorch_bin_checkpoint_imports(tmp_path):
    """Older checkpoints ship pytorch_model.bin: read with weights_only (no code unpickled)."""
    from nemo_aligner.checkpoint.hf import import_hf_model

    ref_model = make_hf_model("llama", tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(ref_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    model, _ = import_hf_model(tmp_path / "bin")
    tokens = _tokens(300)
    assert (_our_logits(model.eval(), tokens)[..., :300] - reference_logits(ref_model, tokens)).abs().max() < 1e-4


def test_unsupported_architecture_names_model_type(tmp_path):
    from nemo_aligner.checkpoint.hf import import_hf_model
    from nemo_aligner.checkpoint.hf_arch import UnsupportedArchitecture

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 64}))
    with pytest.raises(UnsupportedArchitecture, match="model_type 'falcon' is not supported"):
        import_hf_model(tmp_path)


def test_missing_weights_and_shape_mismatch_are_named(tmp_path):
    from nemo_aligner.checkpoint.hf import HFCheckpointError, import_hf_model

    make_hf_model("llama", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(HFCheckpointError, match=r"mlp.gate_proj.weight: shape .* does not fit"):
        import_hf_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="holds no weights"):
        import_hf_model(tmp_path / "m")


def test_exported_config_describes_the_model(tmp_path):
    """A model trained from scratch (no Hugging Face origin) exports as the family it fits."""
    from nemo_aligner.checkpoint.hf import export_hf_model
    from nemo_aligner.models.gpt import build_gpt_model

    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
               num_query_groups=2, encoder_seq_length=32, vocab_size=200)
    model = build_gpt_model(cfg, 200, seed=3).eval()
    export_hf_model(model, cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert config["vocab_size"] == 200 and config["max_position_embeddings"] == 32
    reloaded = hf_class("llama").from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(200)
    assert (_our_logits(model, tokens)[..., :200] - reference_logits(reloaded, tokens)).abs().max() < 1e-4
