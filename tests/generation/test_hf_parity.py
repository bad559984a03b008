"""Greedy generation equals ``transformers``' ``generate(do_sample=False)`` token for token
on random tiny Hugging Face models (saved with ``save_pretrained``, then imported)."""

import pytest
import torch

from generation.tiny import random_prompts
from hf_models import make_hf_model
from nemo_aligner.generation import SamplingParams
from nemo_aligner.generation.consistency import token_mult_prob_error, trainer_logprobs
from nemo_aligner.generation.megatron_engine import MegatronEngine

pytest.importorskip("transformers")


def hf_greedy(model, prompt, steps, eos):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=steps, eos_token_id=eos, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_greedy_equals_transformers_generate(tmp_path, dist_world_of_one, arch, decoder):
    from nemo_aligner.checkpoint.hf import import_hf_model

    hf = make_hf_model(arch, tmp_path)
    model, cfg = import_hf_model(tmp_path)
    vocab = cfg["vocab_size"]
    prompts = random_prompts([7, 3, 12, 1], seed=9, vocab=vocab)
    free = [hf_greedy(hf, p, 12, None) for p in prompts]
    # An EOS that row 0 produces by step 5: ends row 0 there (and any row that emits it).
    eos = free[0][5]
    expected = [hf_greedy(hf, p, 12, eos) for p in prompts]
    eng = MegatronEngine(model, vocab_size=vocab, eos_id=eos, pad_id=0, decoder=decoder)
    out = eng.generate(prompts, SamplingParams(greedy=True, max_new_tokens=12))
    for i, tokens in enumerate(expected):
        n = tokens.index(eos) + 1 if eos in tokens else len(tokens)  # transformers pads after EOS
        assert out.response_ids[i] == tokens[:n], f"row {i}"
        assert bool(out.is_end[i]) == (eos in tokens)
    assert out.is_end[0] and out.response_lengths[0] <= 6
    train = trainer_logprobs(model, out)
    assert token_mult_prob_error(out.logprobs, train, out.response_lengths) < 1.0 + 2e-5
