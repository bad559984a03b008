"""Carrying a NeMo-Aligner setup over: data_prefix in NeMo-Aligner's forms, the tokenizer of the
model one starts from, config.yaml, Weights & Biases, and no deprecation noise from
torch.distributed (real runs of the entry points)."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import DPO_SCRIPT, KTO_SCRIPT, RM_SCRIPT, ROOT, SFT_SCRIPT, read_metrics, run
from reliability.common import TINY

pytestmark = pytest.mark.slow
DATA = ROOT / "data/quickstart"
MODEL = [a for a in TINY if a.startswith("model.")]


def split_lines(src, out_dir, sizes):
    lines = src.read_text().splitlines()
    files, start = [], 0
    for i, n in enumerate(sizes):
        f = out_dir / f"{src.stem}_{i}.jsonl"
        f.write_text("\n".join(lines[start:start + n]) + "\n")
        files.append(f)
        start += n
    return files


TRAINERS = {  # script, algo, data file
    "sft": (SFT_SCRIPT, "sft", DATA / "sft_train.jsonl"),
    "rm": (RM_SCRIPT, "rm", DATA / "preference_train.jsonl"),
    "dpo": (DPO_SCRIPT, "dpo", DATA / "preference_train.jsonl"),
    "kto": (KTO_SCRIPT, "kto", DATA / "kto_train.jsonl"),
}


def loop_args(algo, log_dir, *extra):
    return [*MODEL, f"exp_manager.explicit_log_dir={log_dir}", f"trainer.{algo}.max_steps=1",
            f"trainer.{algo}.val_check_interval=0", f"trainer.{algo}.save_interval=0", *extra]


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_data_prefix_takes_nemo_aligner_lists_and_the_dict_form(trainer, tmp_path):
    script, algo, source = TRAINERS[trainer]
    a, b, c = split_lines(source, tmp_path, [24, 16, 16])
    # The dict form on the command line, a list of two files, and a one-element list.
    proc = run(script, loop_args(algo, tmp_path / "logs", f"model.data.data_prefix={{train: [{a}, {b}], validation: [{c}]}}"))
    assert f"train: 40 samples from {a}, {b}" in proc.stdout or f"train: 40 samples from {a}, {b}".replace("samples", "pairs") in proc.stdout
    assert f"validation: 16 samples from {c}" in proc.stdout


def test_data_prefix_as_a_plain_string_is_one_line(tmp_path):
    proc = run(SFT_SCRIPT, loop_args("sft", tmp_path / "logs", f"model.data.data_prefix={DATA / 'sft_train.jsonl'}"),
               check=False)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "model.data.data_prefix=" in lines[0] and "model.data.data_prefix.train=FILE" in lines[0]


@pytest.fixture(scope="module")
def hf_dir_with_its_own_tokenizer(tmp_path_factory):
    """A tiny Llama with a 157-id word-level tokenizer of its own (not the quickstart's 512)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf_own_tokenizer")
    words = sorted({w for f in ("sft_train.jsonl", "preference_train.jsonl") for line in (DATA / f).read_text().splitlines()
                    for w in json.dumps(json.loads(line)).replace("\\n", " ").split()})[:150]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    vocab = dict(list(vocab.items())[:157])
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out, len(vocab)


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo"])
def test_the_tokenizer_of_the_model_one_starts_from_wins(trainer, hf_dir_with_its_own_tokenizer, tmp_path):
    hf, vocab = hf_dir_with_its_own_tokenizer
    script, algo, _ = TRAINERS[trainer]
    log_dir = tmp_path / "logs"
    args = [f"exp_manager.explicit_log_dir={log_dir}", f"trainer.{algo}.max_steps=1", f"trainer.{algo}.val_check_interval=0",
            f"trainer.{algo}.save_interval=0", f"pretrained_checkpoint.restore_from_path={hf}", "model.encoder_seq_length=64",
            "model.micro_batch_size=2", "model.global_batch_size=4", "model.data.truncation=truncate"]
    run(script, args)  # no model.tokenizer.model: the HF directory's tokenizer (157 ids) is used
    saved = OmegaConf.load(log_dir / "config.yaml")
    assert saved.model.tokenizer.model is None
    state = json.loads((log_dir / "checkpoints").glob("*/model_config.yaml").__next__().with_name("trainer_state.json").read_text())
    assert state["step"] == 1
    from nemo_aligner.checkpoint.distributed import read_model_config

    ckpt = next((log_dir / "checkpoints").iterdir())
    assert read_model_config(ckpt)["vocab_size"] == vocab
    assert (ckpt / "tokenizer" / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()


def test_config_yaml_is_written_and_loads(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run(SFT_SCRIPT, loop_args("sft", log_dir, "model.optim.lr=0.0123"))
    cfg = OmegaConf.load(log_dir / "config.yaml")
    assert cfg.model.optim.lr == 0.0123 and cfg.trainer.sft.max_steps == 1
    assert cfg.model.max_position_embeddings == 64  # resolved, not "${.encoder_seq_length}"
    assert "command: " in proc.stdout and "model.optim.lr=0.0123" in proc.stdout


def test_weights_and_biases_logging(tmp_path):
    events = tmp_path / "wandb.jsonl"
    stubs = str(ROOT / "tests/stubs")
    import sys

    from helpers import own_process

    # Its own python (not a fork of the test server, whose module path is fixed) finds the stub.
    proc = own_process([sys.executable, str(SFT_SCRIPT), *loop_args(
        "sft", tmp_path / "logs", "exp_manager.create_wandb_logger=true", "exp_manager.wandb_logger_kwargs.project=aligner",
        "trainer.sft.max_steps=2")], env={"WANDB_STUB_LOG": str(events), "PYTHONPATH": f"{stubs}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [json.loads(line) for line in events.read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["project"] == "aligner" and calls[0]["has_config"]
    logged = [c for c in calls if c["call"] == "log"]
    assert [c["step"] for c in logged] == [1, 2] and "train/loss" in logged[0]["data"]
    assert calls[-1]["call"] == "finish"
    assert read_metrics(tmp_path / "logs")[-1]["step"] == 2


def test_weights_and_biases_without_the_package_is_one_line(tmp_path):
    proc = run(SFT_SCRIPT, loop_args("sft", tmp_path / "logs", "exp_manager.create_wandb_logger=true"), check=False)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "pip install wandb" in lines[0]
    assert not (tmp_path / "logs").exists()


def test_no_torch_distributed_deprecation_warnings(tmp_path):
    proc = run(SFT_SCRIPT, loop_args("sft", tmp_path / "logs", "trainer.sft.max_steps=2"))
    assert "reduce_scatter_tensor` is deprecated" not in proc.stderr
    assert "all_gather_into_tensor` is deprecated" not in proc.stderr
