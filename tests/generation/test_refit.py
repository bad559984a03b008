"""refit: shared weights are free, an own copy is overwritten in place, and generation
afterwards equals a freshly built engine's."""

import pytest
import torch

from generation.tiny import LLAMA, VOCAB, random_prompts
from nemo_aligner.generation import GenerationError, SamplingParams
from nemo_aligner.generation.consistency import token_mult_prob_error, trainer_logprobs
from nemo_aligner.generation.megatron_engine import MegatronEngine

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8)
SEEDS = [1, 2, 3]


@torch.no_grad()
def optimizer_step(model, seed=0):
    """Stand-in for an optimizer step: every parameter changes in place."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def test_shared_engine_refit_is_free_and_sees_new_weights(make_model):
    model = make_model()
    eng = MegatronEngine(model, vocab_size=VOCAB)
    prompts = random_prompts([4, 7, 2])
    before = eng.generate(prompts, PARAMS, seeds=SEEDS)
    optimizer_step(model)
    eng.refit(model)
    assert eng.model is model and not eng.owns_weights
    after = eng.generate(prompts, PARAMS, seeds=SEEDS)
    fresh = MegatronEngine(model, vocab_size=VOCAB).generate(prompts, PARAMS, seeds=SEEDS)
    assert after.response_ids != before.response_ids
    assert after.response_ids == fresh.response_ids
    torch.testing.assert_close(after.logprobs, fresh.logprobs, rtol=0, atol=0)
    with pytest.raises(GenerationError, match="shares its model's weights"):
        eng.refit(make_model())


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_own_copy_refit_in_place(make_model, precision):
    model = make_model()
    eng = MegatronEngine.with_own_weights(LLAMA, model, vocab_size=VOCAB, precision=precision)
    assert eng.owns_weights and eng.model is not model
    dtype = torch.float32 if precision == "32" else torch.bfloat16
    assert {p.dtype for p in eng.model.parameters()} == {dtype}
    pointers = [p.data_ptr() for p in eng.model.parameters()]
    prompts = random_prompts([4, 7, 2])
    before = eng.generate(prompts, PARAMS, seeds=SEEDS)

    optimizer_step(model)
    eng.refit(model)
    assert [p.data_ptr() for p in eng.model.parameters()] == pointers  # no reallocation
    for (name, p), q in zip(eng.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q.to(dtype)), name
    after = eng.generate(prompts, PARAMS, seeds=SEEDS)
    fresh = MegatronEngine.with_own_weights(LLAMA, model, vocab_size=VOCAB, precision=precision)
    expected = fresh.generate(prompts, PARAMS, seeds=SEEDS)
    assert after.response_ids != before.response_ids
    assert after.response_ids == expected.response_ids
    torch.testing.assert_close(after.logprobs, expected.logprobs, rtol=0, atol=0)
    # Against the fp32 trainer: exact for an fp32 copy, bf16 rounding for a bf16 one.
    error = token_mult_prob_error(after.logprobs, trainer_logprobs(model, after), after.response_lengths)
    assert 1.0 <= error < (1.0 + 1e-5 if precision == "32" else 1.02)


def test_refit_rejects_another_architecture(make_model):
    # The first source is freed right away: a new model may reuse its id().
    eng = MegatronEngine.with_own_weights(LLAMA, make_model(), vocab_size=VOCAB)
    with pytest.raises(GenerationError, match="build the engine at the training tensor_model_parallel_size"):
        eng.refit(make_model(dict(LLAMA, ffn_hidden_size=96)))
    with pytest.raises(GenerationError, match="has no parameter 'decoder.layers.1"):
        eng.refit(make_model(dict(LLAMA, num_layers=1)))


def test_refit_from_a_new_model_object_pairs_again(make_model):
    eng = MegatronEngine.with_own_weights(LLAMA, make_model(seed=1), vocab_size=VOCAB)
    for seed in (2, 3, 4):  # each source is freed before the next is built
        eng.refit(make_model(seed=seed))
    expected = make_model(seed=4)
    for p, q in zip(eng.model.parameters(), expected.parameters()):
        assert torch.equal(p, q)


def test_free_releases_the_engine(make_model):
    model = make_model()
    eng = MegatronEngine.with_own_weights(LLAMA, model, vocab_size=VOCAB)
    eng.free()
    with pytest.raises(GenerationError, match="freed"):
        eng.generate([[1, 2]], PARAMS)
    shared = MegatronEngine(model, vocab_size=VOCAB)
    shared.free()
    assert all(p.numel() for p in model.parameters())  # the training model is untouched
