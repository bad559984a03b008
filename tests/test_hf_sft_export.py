"""Start SFT from a Hugging Face directory, export the result back, load it in ``transformers``.

Runs the real entry points: train_gpt_sft.py with ``pretrained_checkpoint.restore_from_path``
pointing at the HF directory (tokenizer taken from it too), then mcore_to_hf.py and
hf_to_mcore.py.
"""

import json

import pytest
import torch

from helpers import ROOT, SFT_SCRIPT, read_metrics, run
from hf_models import hf_class, hf_config

CONVERT = ROOT / "examples" / "nlp" / "convert"
TOKENIZER = ROOT / "data" / "quickstart" / "tokenizer.json"
TRAIN = ROOT / "data" / "quickstart" / "sft_train.jsonl"


def _hf_llama_with_tokenizer(out_dir):
    """A random tiny Llama whose vocabulary is the bundled tokenizer's, saved with it."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = hf_config("llama")
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = hf_class("llama")(config).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model, tok


def _first_batch_loss(model, tokenizer_dir, n):
    """transformers' per-token response NLL over the first ``n`` training samples."""
    from nemo_aligner.data.datasets import SFTDataset
    from nemo_aligner.data.tokenizers import load_tokenizer

    ds = SFTDataset(str(TRAIN), load_tokenizer(str(tokenizer_dir)), max_seq_length=64)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = ds[i]
            logp = torch.log_softmax(model(x["tokens"].unsqueeze(0)).logits[0].float(), -1)
            nll = -logp.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
            total += float((nll * x["loss_mask"]).sum())
            count += int(x["loss_mask"].sum())
    return total / count


@pytest.mark.slow
def test_sft_from_hf_directory_then_export_loads_in_transformers(tmp_path):
    hf_dir = tmp_path / "hf"
    original, tok = _hf_llama_with_tokenizer(hf_dir)
    log_dir = tmp_path / "run"
    run(SFT_SCRIPT, [
        f"pretrained_checkpoint.restore_from_path={hf_dir}", "model.tokenizer.model=null",
        f"exp_manager.explicit_log_dir={log_dir}", "model.encoder_seq_length=64",
        "model.micro_batch_size=2", "model.global_batch_size=4", "model.data.shuffle=false",
        "trainer.sft.max_steps=4", "trainer.sft.val_check_interval=0", "model.optim.lr=1e-3",
    ])
    metrics = read_metrics(log_dir)
    # Step 1's loss is computed before any update: it is the Hugging Face model's own loss.
    assert metrics[0]["train/loss"] == pytest.approx(_first_batch_loss(original, hf_dir, 4), abs=1e-4)
    final = log_dir / "final_model"
    # The checkpoint keeps the HF directory's tokenizer files, never its weights.
    kept = {p.name for p in (final / "tokenizer").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= kept
    assert not {"model.safetensors", "config.json"} & kept

    out = tmp_path / "exported"
    proc = run(CONVERT / "mcore_to_hf.py", ["--input", str(final), "--output", str(out)])
    assert "wrote" in proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_scaling"]["rope_type"] == "llama3"
    from transformers import AutoTokenizer

    trained = hf_class("llama").from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).encode("hello world") == tok.encode("hello world")
    tokens = torch.randint(0, config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moved = (trained(tokens).logits - original(tokens).logits).abs().max()
    assert moved > 1e-3  # training changed the weights that were exported

    # And back: the exported directory converts to our format and gives the same logits.
    ckpt = tmp_path / "ckpt"
    run(CONVERT / "hf_to_mcore.py", ["--input", str(out), "--output", str(ckpt)])
    from nemo_aligner.models.forward import full_logits
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.setup import model_from_checkpoint

    distributed.initialize()
    ours = full_logits([model_from_checkpoint(ckpt)], tokens)[..., : config["vocab_size"]]
    with torch.no_grad():
        assert (ours - trained(tokens).logits).abs().max() < 1e-4


@pytest.mark.slow
def test_converter_errors_are_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    proc = run(CONVERT / "hf_to_mcore.py", ["--input", str(tmp_path / "bad"), "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: Hugging Face model_type 'bloom' is not supported; supported: llama, mistral, qwen2, gpt2")
    assert not (tmp_path / "o").exists()
    proc = run(CONVERT / "mcore_to_hf.py", ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 1 and "is not one of our checkpoints" in proc.stderr


@pytest.mark.slow
def test_reward_model_checkpoint_exports_as_sequence_classifier(tmp_path, dist_world_of_one):
    from transformers import AutoModelForSequenceClassification

    from nemo_aligner.checkpoint.distributed import save_checkpoint
    from nemo_aligner.models.reward_model import build_reward_model

    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
               encoder_seq_length=32, vocab_size=512, reward_model_type="binary_ranking", num_attributes=1)
    model = build_reward_model(cfg, 512, seed=3).eval()
    save_checkpoint(tmp_path / "rm", [model], cfg, tokenizer_dir=TOKENIZER)
    run(CONVERT / "mcore_to_hf.py", ["--input", str(tmp_path / "rm"), "--output", str(tmp_path / "hf")])
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.pad_token_id == 0  # the tokenizer's <pad>: HF pools the last non-pad token
    tokens = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ours = model(tokens, torch.arange(16).expand(2, -1), attention_mask=None)[:, -1]
        assert (reloaded(padded).logits - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_score_reward_model_scores_a_hugging_face_classifier(tmp_path):
    """score_reward_model.py takes an HF sequence classifier: its rewards are transformers' scores."""
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = hf_config("llama")
    config.vocab_size, config.pad_token_id, config.num_labels = len(tok), tok.pad_token_id, 1
    torch.manual_seed(0)
    ref = LlamaForSequenceClassification(config).eval()
    ref.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    texts = ["a short answer", "a somewhat longer answer with more words in it"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    run(ROOT / "examples" / "nlp" / "gpt" / "score_reward_model.py", [
        f"pretrained_checkpoint.restore_from_path={tmp_path / 'rm'}",
        f"input_file={tmp_path / 'in.jsonl'}", f"output_file={tmp_path / 'out.jsonl'}",
    ])
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == [0, 1]
    for text, line in zip(texts, scored):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]])
        with torch.no_grad():
            assert line["reward"] == pytest.approx(float(ref(ids).logits[0, 0]), abs=1e-4)
