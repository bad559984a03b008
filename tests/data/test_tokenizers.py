import json
import shutil
from pathlib import Path

import pytest
import sentencepiece

from nemo_aligner.data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer

QUICKSTART = Path(__file__).resolve().parents[2] / "data" / "quickstart"
WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing softly".split()


def train_sentencepiece(directory, name, **options):
    """A SentencePiece BPE model (vocab 120) trained on 300 lines of ``WORDS``."""
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 8)) for i in range(300)) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / name), vocab_size=120, model_type="bpe", minloglevel=2, **options
    )
    return directory / f"{name}.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """Default special pieces: unk=0, bos=1, eos=2, no pad."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), "sp")


def test_sentencepiece_round_trip_and_special_ids(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    text = "the lazy dog sings over seven red birds"
    ids = tok.text_to_ids(text)
    assert tok.vocab_size == 120
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad piece: pad falls back to eos
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.ids_to_text(ids) == text
    assert tok.ids_to_text([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_with_pad_piece(tmp_path):
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path, "padded", pad_id=3))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.ids_to_text([3, *tok.text_to_ids("a red fox"), 3]) == "a red fox"


def test_hf_round_trip_with_config_tokens():
    tok = HFTokenizer(QUICKSTART)
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "<|user|>\nReverse the words: cat dog<|end|>\n<|assistant|>\ndog cat<|end|>"
    ids = tok.text_to_ids(text)
    assert ids[0] == tok.text_to_ids("<|user|>")[0] and len(tok.text_to_ids("<|user|>")) == 1
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.ids_to_text(ids) == text
    assert tok.ids_to_text([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == text


def test_hf_special_tokens_from_vocab_or_dict_config(tmp_path):
    shutil.copy(QUICKSTART / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path / "tokenizer.json")  # no config: common tokens <s>, </s>, <pad>
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"}, "pad_token": None}))
    tok = HFTokenizer(tmp_path)
    assert tok.eos_id == tok.text_to_ids("<|end|>")[0]
    assert tok.pad_id == 0  # pad_token null: found in the vocabulary

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    with pytest.raises(ValueError, match="bos_token '<\\|im_start\\|>' is not in the vocabulary"):
        HFTokenizer(tmp_path)


def test_load_tokenizer_dispatch(tmp_path, sp_model):
    assert isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(QUICKSTART), HFTokenizer)
    assert isinstance(load_tokenizer(QUICKSTART / "tokenizer.json"), HFTokenizer)
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


@pytest.mark.parametrize("name", ["missing.model", "no_such_dir", "."])
def test_load_tokenizer_missing(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(path)
    message = str(err.value)
    assert str(path) in message and "tokenizer.json" in message and ".model" in message and "\n" not in message
