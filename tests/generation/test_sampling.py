"""Logit filters and per-row sampling against hand-computed values."""

import math

import pytest
import torch

from nemo_aligner.generation import SamplingParams
from nemo_aligner.generation.sampling import (
    candidates,
    choose_next_tokens,
    first_argmax,
    inverse_cdf_sample,
    mask_end_tokens,
    nucleus,
    row_uniforms,
)

INF = float("-inf")


def draws(seeds):
    """One uniform per row, each from its own seed (what the engine passes for a token)."""
    return row_uniforms([torch.Generator().manual_seed(int(s)) for s in seeds], 1)[:, 0]


def test_top_k_candidates_are_the_k_largest_sorted():
    z = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    values, ids = candidates(z, 2, 1.0)
    assert values.tolist() == [[4.0, 3.0]] and ids.tolist() == [[1, 2]]
    values, ids = candidates(z, 0, 1.0)  # no filter: the vocabulary in id order
    assert ids is None and torch.equal(values, z)
    assert candidates(z, 9, 1.0)[1] is None


def test_nucleus_keeps_the_smallest_prefix_reaching_p():
    sorted_z = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()  # mass before each: 0, 0.5, 0.8, 0.9
    kept = lambda p: (nucleus(sorted_z, p) > INF).tolist()[0]  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert kept(0.01) == [True, False, False, False]  # the most probable token always stays


def test_top_p_without_top_k_sorts_the_vocabulary():
    z = torch.tensor([[0.1, 0.6, 0.3]]).log()
    values, ids = candidates(z, 0, 0.7)
    assert ids.tolist() == [[1, 2, 0]]
    assert (values > INF).tolist() == [[True, True, False]]
    values, ids = candidates(z, 2, 0.5)  # top-k first, then top-p among the two
    assert ids.tolist() == [[1, 2]] and (values > INF).tolist() == [[True, False]]


def test_inverse_cdf_picks_the_interval_holding_u():
    logq = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).log()  # cdf 0.2, 0.2, 0.7, 1.0
    pick = lambda u: int(inverse_cdf_sample(logq, torch.tensor([u], dtype=torch.float64)))  # noqa: E731
    assert [pick(u) for u in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999)] == [0, 0, 2, 2, 3, 3]  # never the 0-prob id


def test_mask_end_tokens_only_in_flagged_rows():
    z = torch.zeros(2, 5)
    out = mask_end_tokens(z, torch.tensor([True, False]), torch.tensor([1, 3]))
    assert out[0].tolist() == [0, INF, 0, INF, 0] and out[1].tolist() == [0] * 5
    assert torch.equal(z, torch.zeros(2, 5))  # not in place


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().repeat(4000, 1)
    tokens, logprobs, sampling_logprobs = choose_next_tokens(logits, SamplingParams(), draws(range(4000)))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    # 4000 draws: the standard error of each frequency is below 0.008.
    assert torch.allclose(freq, probs, atol=0.03)
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    torch.testing.assert_close(sampling_logprobs, logprobs)  # nothing modified the distribution


def test_temperature_and_logprob_kinds():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.5, top_k=2)
    tok, lp, slp = choose_next_tokens(logits, params, draws([0]))
    assert int(tok) in (0, 1)
    assert float(lp) == pytest.approx(float(torch.log_softmax(logits, -1)[0, tok]), abs=1e-6)
    q = torch.softmax(torch.tensor([4.0, 2.0]), -1)  # temperature 0.5 on the top-2 logits
    assert float(slp) == pytest.approx(math.log(float(q[int(tok)])), abs=1e-6)


def test_rows_draw_only_from_their_own_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeds = [5, 6, 7]
    together, _, _ = choose_next_tokens(logits, SamplingParams(), draws(seeds))
    for i, s in enumerate(seeds):
        alone, _, _ = choose_next_tokens(logits[i:i + 1], SamplingParams(), draws([s]))
        assert int(alone) == int(together[i])


def test_greedy_respects_min_length_ban():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    tok, lp, slp = choose_next_tokens(
        logits, SamplingParams(greedy=True), None, torch.tensor([True, False]), torch.tensor([1])
    )
    assert tok.tolist() == [2, 1]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [2, 1]])
    assert slp.tolist() == [0.0, 0.0]


def test_filtered_sampling_follows_the_renormalized_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().repeat(4000, 1)
    tokens, logprobs, sampling_logprobs = choose_next_tokens(logits, SamplingParams(top_k=2), draws(range(4000)))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.tensor([0.6, 0.3]) / 0.9, atol=0.03)
    torch.testing.assert_close(sampling_logprobs, (probs[tokens] / 0.9).log())
    torch.testing.assert_close(logprobs, probs.log()[tokens])


def test_row_uniforms_are_each_rows_own_stream():
    table = row_uniforms([torch.Generator().manual_seed(s) for s in (3, 4)], 5)
    assert table.shape == (2, 5) and table.dtype == torch.float64
    for row, seed in zip(table, (3, 4)):
        assert torch.equal(row, torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    assert ((table >= 0) & (table < 1)).all()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (5, 0.8), (0, 1.0)])
def test_temperature_after_the_cut_equals_cutting_scaled_logits(top_k, top_p):
    z = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0.7, 1.3):
        values, ids = candidates(z, top_k, top_p, temperature=t)
        ref_values, ref_ids = candidates(z / t, top_k, top_p)
        assert torch.equal(values, ref_values)
        assert (ids is None and ref_ids is None) or torch.equal(ids, ref_ids)


@pytest.mark.parametrize("vocab", [300, 8192, 32000, 50257])
def test_first_argmax_is_torchs_argmax_with_ties(vocab):
    """The two-stage argmax returns the first maximum, ties included: within a chunk,
    across chunks, in the tail past the last whole chunk, and with -inf rows."""
    g = torch.Generator().manual_seed(vocab)
    for _ in range(5):
        z = torch.randint(0, 30, (8, vocab), generator=g).float()  # many ties everywhere
        z[0, -1] = 100.0  # the maximum in the tail
        z[1, 5], z[1, -3] = 100.0, 100.0  # equal maxima in the first chunk and the tail
        z[2, 130], z[2, 129] = 100.0, 100.0  # equal maxima inside one chunk
        z[3] = float("-inf")
        z[3, vocab // 2] = 0.0  # everything masked but one token
        z[4, -2], z[4, -1] = 100.0, 100.0  # equal maxima inside the tail
        assert torch.equal(first_argmax(z), z.argmax(dim=-1))
