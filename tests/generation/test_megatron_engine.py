"""MegatronEngine: exactness against cache-free recomputation, sampling reproducibility,
batch-composition invariance, end conditions and input errors."""

import pytest
import torch
from generation.tiny import GPT2, LLAMA, VOCAB, random_prompts, recompute_greedy

from nemo_aligner.generation import GenerationError, SamplingParams
from nemo_aligner.generation.megatron_engine import MegatronEngine

LENGTHS = [5, 11, 1, 8]


def engine(model, **kwargs):
    kwargs.setdefault("vocab_size", VOCAB)
    kwargs.setdefault("pad_id", 0)
    return MegatronEngine(model, **kwargs)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_greedy_equals_no_cache_recomputation(make_model, cfg, decoder):
    model = make_model(cfg)
    prompts = random_prompts(LENGTHS)
    out = engine(model, decoder=decoder).generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))
    assert out.response_lengths.tolist() == [10] * 4 and not out.is_end.any()
    for i, prompt in enumerate(prompts):
        tokens, logprobs = recompute_greedy(model, prompt, 10)
        assert out.response_ids[i] == tokens
        torch.testing.assert_close(out.logprobs[i], logprobs, rtol=0, atol=2e-5)
    assert torch.equal(out.sampling_logprobs, torch.zeros_like(out.sampling_logprobs))  # greedy: point mass


def test_decoders_agree_when_sampling(make_model):
    model = make_model()
    prompts = random_prompts(LENGTHS, seed=3)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=12)
    lean = engine(model, decoder="lean").generate(prompts, params, seeds=[7, 8, 9, 10])
    mega = engine(model, decoder="megatron").generate(prompts, params, seeds=[7, 8, 9, 10])
    assert lean.response_ids == mega.response_ids
    torch.testing.assert_close(lean.logprobs, mega.logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(lean.sampling_logprobs, mega.sampling_logprobs, rtol=0, atol=2e-5)
    # Temperature, top-k and top-p sharpen the distribution: q(token) >= p(token).
    assert (lean.sampling_logprobs >= lean.logprobs - 1e-6).all()


@pytest.mark.parametrize("decoder", ["lean", "megatron"])
def test_sampling_reproducible_and_independent_of_batch(make_model, decoder):
    model = make_model()
    eng = engine(model, decoder=decoder)
    prompts = random_prompts([4, 9, 2, 7, 6], seed=5)
    seeds = [11, 12, 13, 14, 15]
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    full = eng.generate(prompts, params, seeds=seeds)
    again = eng.generate(prompts, params, seeds=seeds)
    assert full.response_ids == again.response_ids
    # Another batch composition: a reordered subset, and chunks of two.
    subset = eng.generate([prompts[3], prompts[0]], params, seeds=[seeds[3], seeds[0]])
    assert subset.response_ids == [full.response_ids[3], full.response_ids[0]]
    chunked = engine(model, decoder=decoder, max_batch_size=2).generate(prompts, params, seeds=seeds)
    assert chunked.response_ids == full.response_ids
    # Different seeds give different samples.
    other = eng.generate(prompts, params, seeds=[s + 100 for s in seeds])
    assert other.response_ids != full.response_ids


def test_equal_length_batches_for_attention_without_padding_masks(make_model):
    """Core attentions other than ours (Transformer Engine's) ignore padding masks: the
    engine then batches prompts of one length only, with the same results."""
    model = make_model()
    prompts = random_prompts([4, 9, 4, 7, 9, 4], seed=8)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    eng = engine(model, decoder="megatron", max_batch_size=2)
    assert not eng.equal_length_batches
    mixed = eng.generate(prompts, params, seeds=list(range(6)))
    eng.equal_length_batches = True
    chunks = eng._chunks(mixed.prompt_ids)
    assert chunks == [[1, 4], [3], [0, 2], [5]]
    assert eng.generate(prompts, params, seeds=list(range(6))).response_ids == mixed.response_ids


def test_default_seeds_follow_sampling_seed(make_model):
    eng = engine(make_model())
    prompts = random_prompts([3, 5], seed=2)
    a = eng.generate(prompts, SamplingParams(max_new_tokens=6, seed=40))
    b = eng.generate(prompts, SamplingParams(max_new_tokens=6), seeds=[40, 41])
    assert a.response_ids == b.response_ids


def test_eos_ends_a_response_and_is_kept(make_model):
    model = make_model()
    prompts = random_prompts(LENGTHS, seed=4)
    free = engine(model).generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))
    eos = free.response_ids[0][3]  # a token row 0 produces at step 3
    out = engine(model, eos_id=eos).generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))
    for i, tokens in enumerate(free.response_ids):
        expected = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        assert out.response_ids[i] == expected
        assert out.response_lengths[i] == len(expected)
        assert bool(out.is_end[i]) == (eos in tokens)
    assert out.response_ids[0][-1] == eos and out.is_end[0]
    # Padding after the end: pad id and zero log-probs.
    n = int(out.response_lengths[0])
    assert (out.response_tokens[0, n:] == 0).all() and (out.logprobs[0, n:] == 0).all()


def test_a_row_that_ended_but_stays_in_the_batch_keeps_its_length(make_model):
    """A finished row stays in the batch until a quarter of it has finished; tokens it is
    still fed (an end token again, here) must not change its length or its response."""
    model = make_model()
    prompts = random_prompts([5, 7, 3, 6, 4, 8, 5, 6], seed=11)
    free = engine(model).generate(prompts, SamplingParams(greedy=True, max_new_tokens=16)).response_ids
    # A token one row produces twice or more and no other row produces at all.
    picks = [(row, tok) for row, tokens in enumerate(free) for tok in set(tokens)
             if tokens.count(tok) >= 2 and not any(tok in other for i, other in enumerate(free) if i != row)]
    assert picks, "the fixed prompts must give such a token"
    row, eos = picks[0]
    out = engine(model, eos_id=eos).generate(prompts, SamplingParams(greedy=True, max_new_tokens=16))
    first = free[row].index(eos) + 1
    assert out.response_ids[row] == free[row][:first] and int(out.response_lengths[row]) == first
    assert bool(out.is_end[row]) and int(out.is_end.sum()) == 1
    assert all(out.response_ids[i] == free[i] for i in range(len(prompts)) if i != row)


def test_min_new_tokens_suppresses_eos(make_model):
    model = make_model()
    prompts = random_prompts(LENGTHS, seed=4)
    free = engine(model).generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))
    eos = free.response_ids[0][3]
    out = engine(model, eos_id=eos).generate(
        prompts, SamplingParams(greedy=True, max_new_tokens=10, min_new_tokens=6)
    )
    row = out.response_ids[0]
    assert len(row) >= 6 and eos not in row[:5]
    assert row[:3] == free.response_ids[0][:3] and row[3] != eos
    # The reported log-prob is the unmodified model's, recomputed without the ban.
    _, logprobs = recompute_greedy(model, prompts[0], 3)
    seq = prompts[0] + row[:3]
    with torch.no_grad():
        logits = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), attention_mask=None)
    expected = torch.log_softmax(logits[0, -1, :VOCAB].float(), -1)[row[3]]
    assert out.logprobs[0, 3] == pytest.approx(float(expected), abs=2e-5)


def test_stop_strings_end_responses(dist_world_of_one):
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.gpt import build_gpt_model

    tok = load_tokenizer("data/quickstart/tokenizer.json")
    model = build_gpt_model(LLAMA, tok.vocab_size, seed=3)
    eng = MegatronEngine(model, tok, eos_id=None)
    prompts = ["Hello there", "The quick brown fox", "a"]
    free = eng.generate(prompts, SamplingParams(greedy=True, max_new_tokens=12))
    text0 = tok.ids_to_text(free.response_ids[0][:4])
    stop = text0[-2:] if len(text0) >= 2 else text0
    out = eng.generate(prompts, SamplingParams(greedy=True, max_new_tokens=12, stop_strings=[stop]))
    for i, tokens in enumerate(free.response_ids):
        hits = [k for k in range(1, len(tokens) + 1) if stop in tok.ids_to_text(tokens[:k])]
        expected = tokens[: hits[0]] if hits else tokens
        assert out.response_ids[i] == expected
        assert bool(out.is_end[i]) == bool(hits)
        if hits:
            assert stop in out.texts[i]
    assert out.is_end[0] and out.response_lengths[0] <= 4


def test_finished_rows_dropped_from_batch_match_single_runs(make_model):
    """Rows that end early leave the batch (and KV cache); the rest must be unaffected."""
    model = make_model()
    prompts = random_prompts([3, 8, 5, 6, 2, 9, 4, 7], seed=6)
    free = engine(model).generate(prompts, SamplingParams(greedy=True, max_new_tokens=8))
    stop = [free.response_ids[i][1] for i in range(4)]  # rows 0-3 end at step 1 or earlier
    params = SamplingParams(max_new_tokens=8, temperature=1.2, stop_token_ids=stop)
    eng = engine(model)
    seeds = list(range(20, 28))
    batch = eng.generate(prompts, params, seeds=seeds)
    singles = [eng.generate([p], params, seeds=[s]) for p, s in zip(prompts, seeds)]
    for i, single in enumerate(singles):
        assert batch.response_ids[i] == single.response_ids[0]
        assert bool(batch.is_end[i]) == bool(single.is_end[0])
        torch.testing.assert_close(batch.logprobs[i], single.logprobs[0].new_zeros(batch.logprobs.shape[1]).index_copy(
            0, torch.arange(single.logprobs.shape[1]), single.logprobs[0]), rtol=0, atol=2e-5)


def test_padded_vocabulary_is_never_generated(make_model):
    """Even from a model whose logits do not mask the padding ids (no masking hook)."""
    model = make_model()
    model.output_layer._forward_hooks.clear()
    prompts = random_prompts(LENGTHS)
    x, pos = torch.tensor([prompts[0]]), torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        best = model(x, pos, None)[0, -1].argmax()
        w = model.output_layer.weight
        w[VOCAB:] = 3 * w[best]  # the padding ids now win the arg-max
        assert model(x, pos, None)[0, -1].argmax() >= VOCAB
    for params in (SamplingParams(greedy=True, max_new_tokens=5), SamplingParams(max_new_tokens=5)):
        out = engine(model).generate(prompts, params)
        assert int(out.response_tokens.max()) < VOCAB


def test_text_prompts_bos_and_decoding(dist_world_of_one):
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.gpt import build_gpt_model

    tok = load_tokenizer("data/quickstart/tokenizer.json")
    model = build_gpt_model(LLAMA, tok.vocab_size, seed=3)
    eng = MegatronEngine(model, tok, add_bos=True)
    out = eng.generate(["Hello"], SamplingParams(greedy=True, max_new_tokens=4))
    assert out.prompt_ids[0] == [tok.bos_id] + tok.text_to_ids("Hello")
    assert out.texts[0] == tok.ids_to_text(out.response_ids[0])
    by_ids = eng.generate([out.prompt_ids[0]], SamplingParams(greedy=True, max_new_tokens=4))
    assert by_ids.response_ids == out.response_ids


def test_bad_requests_get_clear_errors(make_model):
    eng = engine(make_model())  # the model holds 64 positions
    with pytest.raises(GenerationError, match=r"prompt 1 has 60 tokens.*at most 56.*max_new_tokens"):
        eng.generate([[5] * 3, [5] * 60], SamplingParams(max_new_tokens=8))
    eng.generate([[5] * 56], SamplingParams(greedy=True, max_new_tokens=8))  # exactly fits
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        eng.generate([[]], SamplingParams())
    with pytest.raises(GenerationError, match=r"token id 300 outside the vocabulary \[0, 300\)"):
        eng.generate([[1, 300]], SamplingParams())
    with pytest.raises(GenerationError, match="one seed per prompt"):
        eng.generate([[1], [2]], SamplingParams(), seeds=[1])
    with pytest.raises(GenerationError, match="text prompts need a tokenizer"):
        eng.generate(["hi"], SamplingParams())
    with pytest.raises(GenerationError, match="stop_strings needs a tokenizer"):
        eng.generate([[1]], SamplingParams(max_new_tokens=4, stop_strings=["x"]))
    with pytest.raises(GenerationError, match="max_new_tokens=64 leaves no room for a prompt"):
        eng.generate([[1]], SamplingParams(max_new_tokens=64))
    with pytest.raises(GenerationError, match="decoder="):
        engine(make_model(), decoder="vllm")


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop_strings=[""]), "empty string"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kwargs)
