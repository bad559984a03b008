"""Megatron's optimizer as we build it: on CPU torch's Adam runs fused, and takes the step the
per-tensor loop takes."""

import torch

from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.utils.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp

TINY = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
            encoder_seq_length=16)
OPTIM = {"optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95],
                   "sched": {"name": "Constant", "warmup_steps": 0}}}


def run_steps(step_fn=optimizer_step, precision="32", optim=None, fused=True):
    """Three steps of a tiny model; ``(step_fn's results, final parameters)``."""
    cfg = {"optim": {**OPTIM["optim"], **(optim or {})}}
    model = wrap_ddp(build_gpt_model(dict(TINY, precision=precision), 64, seed=3), cfg)
    optimizer = build_optimizer([model], cfg, gradient_clip_val=0.5)
    if not fused:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            assert all(group["fused"] for group in opt.optimizer.param_groups)
            for group in opt.optimizer.param_groups:
                group["fused"] = False
    scheduler = build_scheduler(optimizer, cfg, max_steps=3)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        logits = model(tokens, torch.arange(16).expand(2, -1), attention_mask=None)
        optimizer.scale_loss(logits.float().logsumexp(-1).sum()).backward()
        model.finish_grad_sync()  # as the schedule's finalize_model_grads does
        results.append(step_fn(optimizer, scheduler))
    return results, [p.detach().clone() for p in model.parameters()]


def three_steps(fused: bool):
    results, params = run_steps(fused=fused)
    return [norm for norm, _, _ in results], params


def test_fused_cpu_adam_takes_the_per_tensor_step(dist_world_of_one):
    fused_norms, fused = three_steps(True)
    loop_norms, loop = three_steps(False)
    assert fused_norms[0] > 0.5  # clipping was active
    torch.testing.assert_close(torch.tensor(fused_norms), torch.tensor(loop_norms), rtol=1e-5, atol=0)
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    initial = [p.detach() for p in build_gpt_model(TINY, 64, seed=3).parameters()]
    assert max((a - b).abs().max() for a, b in zip(fused, initial)) > 1e-3  # the weights moved


def test_one_rank_buffer_collectives_are_skipped_and_change_nothing(dist_world_of_one, monkeypatch):
    """At one data-parallel rank the distributed optimizer's reduce-scatter and all-gather
    of the whole gradient / parameter buffer are skipped; the steps are bit for bit those
    with the collectives."""
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from nemo_aligner.utils.optim import _in_place_over_one_rank

    calls = []

    def spying(name):
        real = getattr(buffers, name)
        real = getattr(real, "__wrapped__", real)

        def collective(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return collective

    for name in ("dist_reduce_scatter_func", "dist_all_gather_func"):
        monkeypatch.setattr(buffers, name, _in_place_over_one_rank(spying(name)))
    skipped_norms, skipped = three_steps(True)
    assert calls == []

    for name in ("dist_reduce_scatter_func", "dist_all_gather_func"):
        collective = spying(name)
        collective.one_rank_in_place = True  # so that wrap_ddp leaves it unwrapped
        monkeypatch.setattr(buffers, name, collective)
    real_norms, real = three_steps(True)
    assert set(calls) == {"dist_reduce_scatter_func", "dist_all_gather_func"}
    assert skipped_norms == real_norms
    assert all(torch.equal(a, b) for a, b in zip(skipped, real))


def test_one_rank_buffer_collectives_into_another_buffer_are_a_copy(dist_world_of_one):
    """Over one rank, a gather or reduce-scatter from one buffer into another is a copy made
    here, not through gloo (whose copy on its worker thread leaves an OpenMP pool behind);
    an asynchronous call or a reduction other than sum/avg/max/min still runs the collective."""
    import torch.distributed as dist

    from nemo_aligner.utils.optim import _in_place_over_one_rank

    calls = []

    def collective(output, input_, *args, **kwargs):
        calls.append(kwargs)

    group = dist.new_group([0], backend="gloo")
    wrapped = _in_place_over_one_rank(collective)
    source = torch.randn(4, 8)
    for op in ({}, {"op": dist.ReduceOp.SUM}, {"op": dist.ReduceOp.AVG}):
        out = torch.empty(32)
        assert wrapped(out, source, group=group, **op) is None
        assert torch.equal(out, source.reshape(-1))
    assert calls == []
    wrapped(torch.empty(32), source, group=group, async_op=True)
    wrapped(torch.empty(32), source, group=group, op=dist.ReduceOp.PRODUCT)
    assert len(calls) == 2


def test_a_checkpoint_saved_before_fused_adam_resumes_fused(dist_world_of_one, tmp_path):
    """Adam's ``fused`` flag travels in the saved param groups; a checkpoint written before
    the fused CPU Adam (``fused: None``) must not bring the per-tensor loop back on resume."""
    from nemo_aligner.checkpoint.distributed import load_checkpoint, save_checkpoint

    def inner(optimizer):
        return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]

    model = wrap_ddp(build_gpt_model(TINY, 64, seed=3), {})
    optimizer = build_optimizer([model], OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM, max_steps=3)
    model.zero_grad_buffer()
    model(torch.randint(0, 64, (2, 16)), torch.arange(16).expand(2, -1), attention_mask=None).sum().backward()
    model.finish_grad_sync()
    optimizer_step(optimizer, scheduler)
    for opt in inner(optimizer):
        for group in opt.param_groups:
            group["fused"], group["foreach"] = None, None  # as saved before
    save_checkpoint(tmp_path / "ck", [model], TINY, optimizer, {"step": 1})

    resumed = wrap_ddp(build_gpt_model(TINY, 64, seed=4), {})
    resumed_optimizer = build_optimizer([resumed], OPTIM)
    load_checkpoint(tmp_path / "ck", [resumed], resumed_optimizer)
    assert all(group["fused"] and not group["foreach"] for opt in inner(resumed_optimizer) for group in opt.param_groups)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _broad_step(optimizer, scheduler):
    """optimizer_step as it was: every call inside the CUDA-redirecting mode."""
    import math

    from nemo_aligner.utils.optim import _clip, optimizer_calls

    with optimizer_calls():
        found_inf = optimizer.prepare_grads()
        grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
        stepped = math.isfinite(grad_norm)
        if stepped:
            _clip(optimizer, grad_norm)
            stepped = bool(optimizer.step_with_ready_grads())
    if stepped:
        scheduler.step(increment=1)
    return grad_norm, optimizer.param_groups[0]["lr"], stepped


def test_the_step_outside_the_redirecting_mode_is_the_step_inside_it(dist_world_of_one):
    """optimizer_step runs only the norm and clipping under cuda_on_cpu: at every precision,
    with and without the distributed optimizer, Adam (and SGD without it), its steps are bit
    for bit those run wholly inside the mode (and none of them needs CUDA)."""
    import itertools

    for precision, distributed, name in itertools.product(("32", "bf16", "16"), (True, False), ("adam", "sgd")):
        if distributed and name == "sgd":
            continue  # Megatron's distributed optimizer is Adam only
        optim = {"name": name, "use_distributed_optimizer": distributed}
        narrow, narrow_params = run_steps(optimizer_step, precision, optim)
        broad, broad_params = run_steps(_broad_step, precision, optim)
        case = (precision, distributed, name)
        assert repr(narrow) == repr(broad), case  # (NaN norms: the fp16 loss scale's first overflows)
        # fp16 starts at a loss scale of 2**32: its first steps overflow and are skipped.
        assert any(stepped for _, _, stepped in narrow) or precision == "16", case
        assert all(torch.equal(a, b) for a, b in zip(narrow_params, broad_params)), case


def test_foreach_grad_norm_and_clipping_match_megatrons_fallback(dist_world_of_one):
    """The gradient norm and clipping with one foreach kernel each give Megatron's per-tensor
    fallback's values (norm to float32 rounding, clipped gradients bit for bit), and the
    optimizer uses them."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from nemo_aligner.utils.cpu_support import cuda_on_cpu
    from nemo_aligner.utils.optim import _l2_norm, _foreach_scale

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=g) * scale for shape, scale in (((7, 5), 1.0), ((3,), 40.0), ((64, 32), 0.01))]
    ours, _ = _l2_norm(2048, None, [grads], False)
    with cuda_on_cpu():  # the fallback returns a "cuda" tensor
        theirs, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    expected = torch.cat([g_.reshape(-1) for g_ in grads]).double().norm()
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.double()[0], expected, rtol=1e-6, atol=0)
    # a large gradient: BLAS's dot sums to ~1e-7 of float64's answer (torch's CPU norm, the
    # foreach kernel, is ~2e-5 off here)
    large = torch.randn(1_441_792, generator=g)
    ours, _ = _l2_norm(2048, None, [[large, grads[1]]], False)
    expected = torch.cat([large, grads[1]]).double().norm()
    torch.testing.assert_close(ours.double()[0], expected, rtol=1e-6, atol=0)
    assert _l2_norm(2048, None, [[]], False)[0].tolist() == [0.0]

    clipped, reference = [t.clone() for t in grads], [t.clone() for t in grads]
    _foreach_scale(2048, None, [clipped, clipped], 0.3)
    utils.local_multi_tensor_scale(2048, None, [reference, reference], 0.3)
    assert all(torch.equal(a, b) for a, b in zip(clipped, reference))
    out = [torch.empty_like(t) for t in grads]
    _foreach_scale(2048, None, [grads, out], 0.3)
    assert all(torch.equal(a, b) for a, b in zip(out, reference))

    run_steps()  # builds an optimizer
    assert clip_grads.l2_norm_impl is _l2_norm and clip_grads.multi_tensor_scale_impl is _foreach_scale
