"""The lean decoder computes the model's own forward (config variants), and knows when it
cannot."""

import pytest
import torch

from generation.tiny import GPT2, LLAMA, VOCAB, random_prompts
from nemo_aligner.generation.context_decoder import MegatronContextDecoder
from nemo_aligner.generation.lean_decoder import LeanDecoder, PackedOutputProduct, _norm, unsupported_reason

VARIANTS = {
    "llama": LLAMA,
    "gpt2": GPT2,
    "qkv_bias": dict(LLAMA, qkv_bias=True),
    "bias_relu_mha": dict(LLAMA, bias=True, activation="relu", num_query_groups=4),
    "partial_rotary_scaled": dict(LLAMA, rotary_percent=0.5, rope_scaling={"factor": 4.0}, rotary_base=500),
    "gqa_one_group": dict(LLAMA, num_query_groups=1, normalization="layernorm"),
}


def slots_for(lengths, extra):
    """Left-padding bookkeeping as the engine builds it."""
    lens = torch.tensor(lengths)
    width = int(lens.max())
    slot = torch.arange(width + extra)
    pad = width - lens
    return (slot[None] - pad[:, None]).clamp(min=0), slot[None] >= pad[:, None]


def left_padded(prompts, extra):
    """``(tokens [B, P], positions, key_valid)`` for ``prompts`` and ``extra`` steps, as
    the engine lays them out."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p)
    return (tokens, *slots_for([len(p) for p in prompts], extra))


@pytest.mark.parametrize("lengths", [[6, 3, 9], [5, 5, 5], [1, 7, 2]], ids=["padded", "unpadded", "one_token"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_prefill_and_steps_equal_model_forward(make_model, name, lengths):
    """The packed prefill (real tokens only) and the steps give the model's own logits."""
    model = make_model(VARIANTS[name]).eval()
    assert unsupported_reason(model) is None
    prompts = random_prompts(lengths, seed=1)
    continuation = random_prompts([4, 4, 4], seed=2)
    tokens, positions, key_valid = left_padded(prompts, 4)
    with LeanDecoder(model, positions, key_valid, VOCAB) as dec:
        got = [dec.prefill(tokens)] + [dec.step(torch.tensor([c[t] for c in continuation])) for t in range(4)]
    for i, p in enumerate(prompts):
        seq = p + continuation[i]
        ref = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), attention_mask=None)[0]
        for t in range(5):
            torch.testing.assert_close(got[t][i], ref[len(p) - 1 + t, :VOCAB], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["llama", "bias_relu_mha", "gpt2"])
@torch.no_grad()
def test_steps_reuse_their_buffers_and_remake_them_for_kept_rows(make_model, name):
    """A step writes into the buffers made at the first step (no per-step products'
    allocations); after ``keep_rows`` they are made anew for the smaller batch, and the
    kept rows' logits still equal the model's forward."""
    model = make_model(VARIANTS[name]).eval()
    prompts = random_prompts([4, 7, 2], seed=5)
    continuation = random_prompts([5, 5, 5], seed=6)
    tokens, positions, key_valid = left_padded(prompts, 5)
    kept = [2, 0]
    with LeanDecoder(model, positions, key_valid, VOCAB) as dec:
        dec.prefill(tokens)
        got = {i: [] for i in range(3)}
        pointers = set()
        for t in range(2):
            logits = dec.step(torch.tensor([c[t] for c in continuation]))
            pointers.add((dec._plan.residual_t.data_ptr(), dec._plan.layers[0].qkv_t.data_ptr()))
            for i in range(3):
                got[i].append(logits[i])
        assert len(pointers) == 1 and dec._plan.residual_t.shape == (64, 3)
        dec.keep_rows(torch.tensor(kept))
        for t in range(2, 5):
            logits = dec.step(torch.tensor([continuation[i][t] for i in kept]))
            for row, i in enumerate(kept):
                got[i].append(logits[row])
        assert dec._plan.residual_t.shape == (64, 2)
    for i in range(3):
        seq = prompts[i] + continuation[i]
        ref = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), attention_mask=None)[0]
        for t, logits in enumerate(got[i]):
            torch.testing.assert_close(logits, ref[len(prompts[i]) + t, :VOCAB], rtol=0, atol=2e-5)


@torch.no_grad()
def test_context_decoder_equals_model_forward(make_model):
    model = make_model().eval()
    prompts = random_prompts([2, 7], seed=3)
    positions, key_valid = slots_for([2, 7], 2)
    tokens = torch.tensor([[0] * 5 + prompts[0], prompts[1]])
    with MegatronContextDecoder(model, positions, key_valid, VOCAB) as dec:
        got = [dec.prefill(tokens), dec.step(torch.tensor([11, 12]))]
    assert model.rotary_pos_emb.__class__.__name__ == "RotaryEmbedding"  # restored on exit
    for i, p in enumerate(prompts):
        seq = p + [11 + i]
        ref = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), attention_mask=None)[0]
        torch.testing.assert_close(got[0][i], ref[len(p) - 1, :VOCAB], rtol=0, atol=2e-5)
        torch.testing.assert_close(got[1][i], ref[len(p), :VOCAB], rtol=0, atol=2e-5)


@pytest.mark.parametrize("hidden", [64, 688])  # 688: the mean's division is not exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_bitwise_torchs(dtype, hidden):
    norm = torch.nn.RMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    for shape in ((16, 1, hidden), (3, 37, hidden)):
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
        assert torch.equal(_norm(norm)(x), norm(x))


def test_unsupported_models_are_named(make_model):
    model = make_model()
    layer = model.decoder.layers[0]
    original = layer.mlp.linear_fc1
    layer.mlp.linear_fc1 = torch.nn.Sequential(original)  # e.g. an adapter wrapping a linear
    assert "Sequential" in unsupported_reason(model)
    layer.mlp.linear_fc1 = original
    model.config.qk_layernorm = True
    assert unsupported_reason(model) == "config.qk_layernorm=True"
    model.config.qk_layernorm = False
    assert unsupported_reason(model) is None


def test_engine_falls_back_to_context_decoder(make_model):
    from nemo_aligner.generation import GenerationError
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    model = make_model()
    model.config.qk_layernorm = True  # not modelled by the lean decoder
    try:
        assert MegatronEngine(model, vocab_size=VOCAB).decoder == "megatron"
        with pytest.raises(GenerationError, match="lean decoder does not support config.qk_layernorm"):
            MegatronEngine(model, vocab_size=VOCAB, decoder="lean")
    finally:
        model.config.qk_layernorm = False
    assert MegatronEngine(model, vocab_size=VOCAB).decoder == "lean"


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
def test_packed_output_product_equals_the_product_and_repacks_for_another_weight():
    g = torch.Generator().manual_seed(0)
    weight, other = (torch.randn(8192, 64, generator=g) for _ in range(2))
    product = PackedOutputProduct()
    assert product.applies(weight)
    assert not product.applies(weight[:100]) and not product.applies(weight.bfloat16())
    for rows in (16, 5, 1):  # the batch shrinks as rows finish
        x = torch.randn(rows, 64, generator=g)
        got = product(x, weight)
        assert got.is_contiguous()
        # fp32 sums of 64 products in another order: a few ulps of outputs up to ~30 (seen:
        # 1.1e-5 at 13.6 with AVX-512 kernels), hence the relative term.
        torch.testing.assert_close(got, x @ weight.t(), rtol=2e-6, atol=1e-5)
    packed = product._packed
    product(x, weight)
    assert product._packed is packed  # packed once per weight
    torch.testing.assert_close(product(x, other), x @ other.t(), rtol=2e-6, atol=1e-5)


@needs_onednn
def test_engine_with_packed_output_product_gives_the_same_generation(make_model, monkeypatch):
    """The packed product on the tiny model's (sliced, 300 of 384 rows) output weight: the
    same tokens and log-probs as MKL's product, across chunks of one call."""
    from nemo_aligner.generation import SamplingParams
    from nemo_aligner.generation.megatron_engine import MegatronEngine

    model = make_model()
    prompts = random_prompts([5, 11, 1, 8], seed=4)
    eng = MegatronEngine(model, vocab_size=VOCAB, pad_id=0, decoder="lean", max_batch_size=2)
    results = {}
    calls, original = [], PackedOutputProduct.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(PackedOutputProduct, "__call__", counted)
    for packed in (False, True):
        monkeypatch.setattr(PackedOutputProduct, "MIN_ROWS", 1 if packed else 1 << 40)
        for greedy in (True, False):
            params = SamplingParams(greedy=greedy, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=32)
            results[packed, greedy] = eng.generate(prompts, params, seeds=[1, 2, 3, 4])
    assert len(calls) == 2 * 2 * 32  # 2 calls x 2 chunks x (prefill + 31 steps)
    for greedy in (True, False):
        a, b = results[False, greedy], results[True, greedy]
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
