"""token_mult_prob_error: the formula, and engine vs trainer log-probs on a real model."""

import math

import torch

from generation.tiny import GPT2, VOCAB, random_prompts
from nemo_aligner.generation import SamplingParams
from nemo_aligner.generation.consistency import token_mult_prob_error, trainer_logprobs
from nemo_aligner.generation.megatron_engine import MegatronEngine


def test_metric_formula_counts_only_response_tokens():
    gen = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    train = torch.tensor([[-1.5, -2.0, 9.0], [-0.25, 7.0, 7.0]])
    lengths = torch.tensor([2, 1])
    expected = (math.exp(0.5) + 1.0 + math.exp(0.25)) / 3
    assert abs(token_mult_prob_error(gen, train, lengths) - expected) < 1e-12


def test_engine_logprobs_match_trainer(make_model):
    model = make_model(GPT2)
    out = MegatronEngine(model, vocab_size=VOCAB).generate(
        random_prompts([3, 9, 5]), SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10), seeds=[4, 5, 6]
    )
    train = trainer_logprobs(model, out)
    torch.testing.assert_close(out.logprobs, train, rtol=0, atol=2e-5)
    assert 1.0 <= token_mult_prob_error(out.logprobs, train, out.response_lengths) < 1.0 + 2e-5
    assert model.training  # the trainer's mode is restored
