import importlib.util
import json
from pathlib import Path

from nemo_aligner.data.datasets import SFTDataset, read_jsonl
from nemo_aligner.data.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "data" / "quickstart"


def test_generator_reproduces_bundled_data(tmp_path):
    spec = importlib.util.spec_from_file_location("make_quickstart_data", ROOT / "examples/nlp/data/make_quickstart_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--output-dir", str(tmp_path)])
    for name in ("sft_train.jsonl", "sft_val.jsonl", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name
    fresh = load_tokenizer(tmp_path)
    assert fresh.vocab_size == 512 and (fresh.pad_id, fresh.bos_id, fresh.eos_id) == (0, 1, 2)


def test_bundled_data_shape_and_lengths():
    assert sum(p.stat().st_size for p in QUICKSTART.iterdir()) < 2_000_000
    train = [s for _, s in read_jsonl(QUICKSTART / "sft_train.jsonl")]
    chats = [s for s in train if "conversations" in s]
    assert (len(train), len(chats), len(read_jsonl(QUICKSTART / "sft_val.jsonl"))) == (2200, 200, 200)
    assert {"from" in s["conversations"][0] for s in chats} == {True, False}  # ShareGPT and OpenAI keys

    tokenizer = load_tokenizer(QUICKSTART)
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>", "<pad>"):
        assert len(tokenizer.text_to_ids(marker)) == 1, marker
    for name in ("sft_train.jsonl", "sft_val.jsonl"):
        dataset = SFTDataset(QUICKSTART / name, tokenizer, 64)  # every sample fits 64 tokens
        assert dataset.num_truncated == dataset.num_dropped == 0
        assert sum(dataset.lengths) / len(dataset) < 32
    assert json.loads((QUICKSTART / "tokenizer_config.json").read_text()) == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
