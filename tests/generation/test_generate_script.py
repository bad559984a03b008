"""examples/nlp/gpt/generate.py end to end: our checkpoints and Hugging Face directories in,
JSONL out; bad input fails with one line naming file:line and writes nothing."""

import importlib.util
import json

import pytest
import torch

from helpers import ROOT, run
from hf_models import hf_class, hf_config

pytestmark = pytest.mark.slow  # each case starts the entry point

SCRIPT = ROOT / "examples" / "nlp" / "gpt" / "generate.py"
TOKENIZER = ROOT / "data" / "quickstart" / "tokenizer.json"
CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
           encoder_seq_length=64, vocab_size=512)
PROMPTS = [{"text": "Hello there", "id": 1}, {"text": "The quick brown fox"}, {"text": "a"}]


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dist_world_of_one):
    from nemo_aligner.checkpoint.distributed import save_checkpoint
    from nemo_aligner.models.gpt import build_gpt_model

    model = build_gpt_model(CFG, 512, seed=5)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "model", [model], CFG, tokenizer_dir=TOKENIZER), model


def generate(tmp_path, source, *overrides, lines=PROMPTS, check=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = run(SCRIPT, [f"pretrained_checkpoint.restore_from_path={source}", f"input_file={inp}",
                        f"output_file={out}", *overrides], check=check)
    return proc, out


def test_checkpoint_greedy_equals_engine(tmp_path, checkpoint):
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.generation import SamplingParams
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    path, model = checkpoint
    _, out = generate(tmp_path, path, "sampling.greedy=true", "sampling.max_new_tokens=6", "sampling.min_new_tokens=2")
    rows = read_jsonl(out)
    tok = load_tokenizer(TOKENIZER)
    expected = MegatronEngine(model, tok).generate(
        [p["text"] for p in PROMPTS], SamplingParams(greedy=True, max_new_tokens=6, min_new_tokens=2)
    )
    assert [{k: v for k, v in r.items() if k not in ("response", "response_ids")} for r in rows] == PROMPTS
    assert [r["response_ids"] for r in rows] == expected.response_ids
    assert [r["response"] for r in rows] == expected.texts


def test_sampled_output_does_not_depend_on_batch_size(tmp_path, checkpoint):
    path, _ = checkpoint
    args = ("sampling.temperature=1.3", "sampling.top_p=0.95", "sampling.max_new_tokens=6", "sampling.seed=7")
    _, one = generate(tmp_path / "a", path, *args, "batch_size=1")
    _, three = generate(tmp_path / "b", path, *args, "batch_size=3")
    assert read_jsonl(one) == read_jsonl(three)
    _, other_seed = generate(tmp_path / "c", path, *args[:-1], "sampling.seed=8", "batch_size=3")
    assert read_jsonl(other_seed) != read_jsonl(one)


def test_hf_directory_greedy_equals_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = hf_config("llama")
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    hf = hf_class("llama")(config).eval()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    _, out = generate(tmp_path, hf_dir, "sampling.greedy=true", "sampling.max_new_tokens=8")
    for prompt, row in zip(PROMPTS, read_jsonl(out)):
        ids = tok(prompt["text"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                              pad_token_id=tok.pad_token_id)
        ref = ref[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert row["response_ids"] == ref


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("lines,needle", [
    ([{"text": "a"}, '{"text": '], "in.jsonl:2: invalid JSON"),
    ([{"text": "a"}, {"text": "b"}, {"prompt": "c"}], "in.jsonl:3: missing field 'text'"),
    ([{"text": 5}], "in.jsonl:1: field 'text' must be a string"),
    ([{"text": "a"}, {"text": "word " * 80}], "in.jsonl:2: prompt has"),
], ids=["bad-json", "missing-text", "not-a-string", "too-long"])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, checkpoint, lines, needle):
    proc, out = generate(tmp_path, checkpoint[0], "sampling.max_new_tokens=8", lines=lines, check=False)
    assert proc.returncode == 1
    assert needle in error_line(proc)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))


def test_missing_input_file(tmp_path, checkpoint):
    out = tmp_path / "out.jsonl"
    proc = run(SCRIPT, [f"pretrained_checkpoint.restore_from_path={checkpoint[0]}",
                        f"input_file={tmp_path}/nope.jsonl", f"output_file={out}"], check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "nope.jsonl not found" in line and "input_file" in line
    assert not out.exists()


def test_trtllm_engine_without_tensorrt_llm_is_one_line(tmp_path, checkpoint):
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed")
    proc, out = generate(tmp_path, checkpoint[0], "engine=trtllm", f"trtllm.engine_dir={tmp_path}/engine", check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "TensorRT-LLM is not installed" in line and "engine=megatron" in line
    assert not out.exists()
