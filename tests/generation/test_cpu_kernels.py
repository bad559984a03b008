"""The compiled decoding kernels: their numbers against torch's, their independence of the
thread count and of the batch, their build cache, and the fallback where they cannot run."""

import logging

import pytest
import torch

from generation.tiny import VOCAB, random_prompts
from nemo_aligner.generation import SamplingParams, cpu_kernels
from nemo_aligner.generation.megatron_engine import MegatronEngine

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler to build the CPU kernels")


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """Forget the loaded library and build into an empty cache; returns the cache path."""
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "lib": None})
    monkeypatch.setenv("NEMO_ALIGNER_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_product(got, weight, x, base=None):
    """``got`` equals ``base + weight @ x`` within the rounding bound of a float32 sum of
    ``K`` products, ``K * 2**-24 * (|W| @ |x|)`` (plus the final add), against float64."""
    exact = weight.double() @ x.double()
    bound = weight.shape[1] * 2.0**-24 * (weight.double().abs() @ x.double().abs())
    if base is not None:
        exact = exact + base.double()
        bound = bound + 2.0**-24 * exact.abs()
    err = (got.double() - exact).abs()
    assert bool((err <= bound + 1e-30).all()), f"max error {float(err.max()):.3g}, bound there {float(bound.flatten()[err.argmax()]):.3g}"


@needs_kernels
@pytest.mark.parametrize("m,k,b", [(7, 5, 3), (13, 64, 17), (1024, 256, 16), (2048, 256, 1), (100, 30, 64)])
def test_product_is_within_float32_rounding_for_any_layout(m, k, b):
    weight, x_rows = rand(m, k, seed=1), rand(b, k, seed=2)
    layouts = {"transposed": x_rows.t(), "contiguous": x_rows.t().contiguous(), "strided": rand(k, 2 * b, seed=2)[:, ::2]}
    for x in layouts.values():
        for out in (torch.empty(m, b), torch.empty(b, m).t()):  # row-major [M, B] and its transpose
            assert_product(cpu_kernels.product(weight, x, out), weight, x)
        base = rand(m, b, seed=4)
        assert_product(cpu_kernels.product(weight, x, base.clone(), accumulate=True), weight, x, base)
    sliced = rand(m + 3, k, seed=3)[:m]  # the output layer's weight cut to the real vocabulary
    assert_product(cpu_kernels.product(sliced, x, torch.empty(m, b)), sliced, x)


@needs_kernels
def test_product_does_not_depend_on_threads_or_other_rows():
    """Each result is one thread's FMA chain in k order: bitwise the same for a column
    computed alone or in a batch, on one thread or two."""
    weight, x = rand(301, 96, seed=4), rand(96, 16, seed=5)
    batch = cpu_kernels.product(weight, x, torch.empty(301, 16))
    for j in (0, 7, 15):
        alone = cpu_kernels.product(weight, x[:, j:j + 1], torch.empty(301, 1))
        assert torch.equal(alone[:, 0], batch[:, j])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_kernels.product(weight, x, torch.empty(301, 16)), batch)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_product_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match=r"product: x \(5, 2\)"):
        cpu_kernels.product(rand(4, 3), rand(5, 2), torch.empty(4, 2))
    with pytest.raises(ValueError, match="product: x .* torch.float64"):
        cpu_kernels.product(rand(4, 3), rand(3, 2).double(), torch.empty(4, 2))
    with pytest.raises(ValueError, match="product: out"):
        cpu_kernels.product(rand(4, 3), rand(3, 2), torch.empty(5, 2))
    with pytest.raises(ValueError, match="not a float32 CPU matrix with contiguous rows"):
        cpu_kernels.product(rand(3, 4).t(), rand(3, 2), torch.empty(4, 2))


@needs_kernels
@pytest.mark.parametrize("b,g,p,d,slots,length", [(16, 2, 2, 64, 40, 33), (3, 1, 4, 20, 9, 9), (2, 3, 1, 8, 5, 1)])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_equals_sdpa(b, g, p, d, slots, length, masked):
    """On the engine's layouts: queries a slice of the fused qkv buffer, keys and values
    side by side in the cache (``[B, G, 2, slots, D]``), padding masked with -inf."""
    qkv = rand(b, g, p + 2, d, seed=6)
    kv = rand(b, g, 2, slots, d, seed=7)
    q, keys, values = qkv[:, :, :p], kv[:, :, 0], kv[:, :, 1]
    bias = None
    if masked:
        valid = torch.arange(slots)[None, :] >= torch.arange(b)[:, None] % max(length - 1, 1)  # row r: r slots of padding
        bias = torch.zeros(b, slots).masked_fill_(~valid, float("-inf"))
    scale = d ** -0.5
    attend = cpu_kernels.DecodeAttention(q, keys, values, bias, scale, torch.empty(b, g, p, d))
    mask = None if bias is None else bias[:, None, None, :length]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, keys[:, :, :length], values[:, :, :length], attn_mask=mask, scale=scale)
    torch.testing.assert_close(attend(length), ref, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_attention_checks_its_buffers_once_and_its_length():
    q, kv = rand(2, 1, 2, 8), rand(2, 1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention: q"):
        cpu_kernels.DecodeAttention(q.double(), kv[:, :, 0], kv[:, :, 1], None, 1.0, torch.empty(2, 1, 2, 8))
    with pytest.raises(ValueError, match="attention: bias"):
        cpu_kernels.DecodeAttention(q, kv[:, :, 0], kv[:, :, 1], torch.zeros(2, 4), 1.0, torch.empty(2, 1, 2, 8))
    attend = cpu_kernels.DecodeAttention(q, kv[:, :, 0], kv[:, :, 1], None, 1.0, torch.empty(2, 1, 2, 8))
    with pytest.raises(ValueError, match="attention over 6 slots of 5"):
        attend(6)


@needs_kernels
def test_the_library_brings_no_openmp_runtime_of_its_own(fresh_load):
    """Built and loaded anew, it binds the ``libgomp`` torch has loaded: it runs on torch's
    OpenMP threads, not on a second pool's."""
    before = cpu_kernels._openmp_runtimes()
    assert before  # torch's
    assert cpu_kernels.library() is not None
    assert cpu_kernels._openmp_runtimes() == before


@needs_kernels
def test_library_is_built_once_into_the_cache(fresh_load, monkeypatch):
    assert cpu_kernels.library() is not None
    built = sorted(p.name for p in fresh_load.glob("decode_kernels-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "lib": None})

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernels, "_compile", no_compile)
    assert cpu_kernels.library() is not None  # loaded from the cache


def test_without_a_working_compiler_torchs_kernels_are_used(fresh_load, monkeypatch, caplog, make_model):
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.library() is None
    assert "could not build the CPU decoding kernels" in caplog.text
    assert not list(fresh_load.glob("*.so"))  # nothing half-built is left to load later
    model = make_model()
    out = MegatronEngine(model, vocab_size=VOCAB, pad_id=0, decoder="lean").generate(
        random_prompts([3, 6], seed=8), SamplingParams(greedy=True, max_new_tokens=4))
    assert out.response_lengths.tolist() == [4, 4]


def test_without_a_compiler_the_log_says_how_to_get_the_kernels(fresh_load, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.library() is None
    assert "no C compiler found" in caplog.text and "NEMO_ALIGNER_CPU_KERNELS=0" in caplog.text


def test_kernels_can_be_switched_off(fresh_load, monkeypatch):
    monkeypatch.setenv("NEMO_ALIGNER_CPU_KERNELS", "0")
    assert cpu_kernels.library() is None
    assert not fresh_load.exists()  # not even built


@needs_kernels
@pytest.mark.parametrize("max_rows", [32, 2], ids=["kernel_products", "mkl_products_until_rows_end"])
@pytest.mark.parametrize("greedy", [True, False])
def test_engine_generates_the_same_with_and_without_kernels(make_model, monkeypatch, greedy, max_rows):
    """The lean decoder's steps on the kernels (products, output layer, attention) against
    torch's: the same tokens, log-probs within rounding; prompts of different lengths
    (padding masked) and a batch that shrinks as rows end (with ``MAX_ROWS`` 2, the
    products of the 4-row batch are MKL's and those of the shrunk batch the kernel's)."""
    monkeypatch.setattr(cpu_kernels, "MAX_ROWS", max_rows)
    model = make_model()
    prompts = random_prompts([5, 11, 1, 8], seed=9)
    eng = MegatronEngine(model, vocab_size=VOCAB, pad_id=0, eos_id=3, decoder="lean")
    params = SamplingParams(greedy=greedy, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24)
    lib = cpu_kernels.library()
    calls = []

    class Counted:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "lib": Counted()})
    with_kernels = eng.generate(prompts, params, seeds=[1, 2, 3, 4])
    assert "decode_attention_args" in calls and ("decode_product_args" in calls or max_rows < 4)
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "lib": None})
    without = eng.generate(prompts, params, seeds=[1, 2, 3, 4])
    assert with_kernels.response_ids == without.response_ids
    assert torch.equal(with_kernels.response_lengths, without.response_lengths)
    torch.testing.assert_close(with_kernels.logprobs, without.logprobs, rtol=0, atol=1e-5)
